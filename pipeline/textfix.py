"""Text repair: wikitext to plain prose, mojibake and encoding repair, Unicode and whitespace norms.

Each function returns the new text; `repair` also names the repairs it made so the clean stage can
count them.
"""

from __future__ import annotations

import itertools
import re
import unicodedata

import ftfy
import mwparserfromhell
from ftfy.badness import is_bad
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

# Link namespaces whose target is not prose: media, categories, and interlanguage/interwiki links.
DROPPED_LINK_PREFIX = re.compile(
    r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]{2,8})?|wikt|wiktionary|commons|s|q)\s*:",
    re.IGNORECASE,
)
STYLE_QUOTES = re.compile(r"'{2,}")
COMMENT = re.compile(r"<!--.*?(-->|$)", re.DOTALL)
REF_TAG = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}")
TABLE_TOKEN = re.compile(r"^[ \t]*\{\||^[ \t]*\|\}", re.MULTILINE)
MEDIA_LINK_START = re.compile(r"\[\[\s*:?\s*(file|image|media)\s*:", re.IGNORECASE)
DROPPED_TAGS = frozenset(
    {"ref", "references", "table", "gallery", "math", "chem", "score", "timeline", "imagemap",
     "syntaxhighlight", "source", "pre", "nowiki", "templatedata", "graph", "mapframe", "hiero"}
)
LINE_BREAK_TAGS = frozenset({"br", "p", "div", "li", "dd", "dt", "tr"})
# What survives a parse of broken markup: table rows, unmatched template or link braces.
MARKUP_LEFTOVER_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\|\+|!\s)")
MARKUP_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|<ref[^>]*>|</ref>|\{\||\|\}|__[A-Z]+__")

# Characters of the high halves of cp1252 and Mac Roman: the alphabet of mojibake in English text.
_LEGACY_HIGH = "".join(
    sorted({bytes([b]).decode(enc, "ignore") for enc in ("cp1252", "mac_roman") for b in range(128, 256)}
           - {""})
)
# A run of non-ASCII characters and underscores (the file that taught us this replaced the bytes
# it lost with '_'). It is mojibake garbage when it holds an underscore, or is two or more
# characters long and holds a legacy-high symbol other than prose punctuation, three or more
# legacy-high letters, or a lower-case letter followed by an upper-case one. Real words' accents
# ("informação", "Über"), dashes and quotes ("’’"), and other scripts (中文, Ελληνικά) pass.
NON_ASCII_RUN = re.compile(r"_*[^\x00-\x7f\s](?:_*[^\x00-\x7f\s])*_*")
LEGACY_HIGH = frozenset(_LEGACY_HIGH)
PROSE_PUNCTUATION = frozenset("–—‘’‚“”„…•·°«»‹›")
# Mojibake always puts a legacy-high character right before another non-ASCII one: a cheap scan
# for that pair decides whether ftfy's (much slower) badness check needs to run at all.
MOJIBAKE_HINT = re.compile(f"[{re.escape(_LEGACY_HIGH)}][^\\x00-\\x7f]")
HTML_ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff\ufffd]")
SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
BLANK_LINES = re.compile(r"\n{3,}")


def _plain(code: Wikicode) -> str:
    parts: list[str] = []
    for node in code.nodes:
        if isinstance(node, Text):
            parts.append(node.value)
        elif isinstance(node, Wikilink):
            title = str(node.title)
            if DROPPED_LINK_PREFIX.match(title):
                continue
            parts.append(_plain(node.text) if node.text else title.split("#")[0])
        elif isinstance(node, ExternalLink):
            if node.title:
                parts.append(_plain(node.title))
        elif isinstance(node, Heading):
            parts.append(f"\n{_plain(node.title).strip()}\n")
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in DROPPED_TAGS:
                continue
            if node.contents:
                parts.append(_plain(node.contents))
            if tag in LINE_BREAK_TAGS:
                parts.append("\n")
        elif isinstance(node, HTMLEntity):
            parts.append(node.normalize())
        elif isinstance(node, Template | Comment | Argument):
            continue
    return "".join(parts)


def drop_balanced(text: str, tokens: re.Pattern[str], opener: str) -> str:
    """Remove every outermost span between an opener and its matching closer (nesting counted)."""
    parts: list[str] = []
    depth, keep_from, start = 0, 0, 0
    for match in tokens.finditer(text):
        if match.group() == opener:
            if depth == 0:
                start = match.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                parts.append(text[keep_from:start])
                keep_from = match.end()
    parts.append(text[keep_from:] if depth == 0 else text[keep_from:start])
    return "".join(parts)


def drop_unwanted_markup(wikitext: str) -> str:
    """Cut what the prose never keeps (comments, references, templates, tables, media links) before
    parsing: the parser then builds a far smaller tree, and broken markup inside those spans (an
    unbalanced quote in a caption) can no longer derail the parse of what follows."""
    text = COMMENT.sub("", wikitext)
    text = REF_TAG.sub("", text)
    text = drop_balanced(text, TEMPLATE_TOKEN, "{{")
    text = drop_balanced(text, TABLE_TOKEN, "{|")
    return drop_media_links(text)


def drop_media_links(wikitext: str) -> str:
    """Remove [[File:...]] / [[Image:...]] blocks, nested links in captions included, before parsing:
    a caption with unbalanced bold/italic quotes makes the parser give up on the whole link."""
    parts: list[str] = []
    position = 0
    for match in MEDIA_LINK_START.finditer(wikitext):
        if match.start() < position:
            continue  # inside a block already removed
        depth, i = 0, match.start()
        while i < len(wikitext) - 1:
            pair = wikitext[i : i + 2]
            if pair in ("[[", "]]"):
                depth += 1 if pair == "[[" else -1
                i += 2
                if depth == 0:
                    break
            else:
                i += 1
        parts.append(wikitext[position : match.start()])
        position = i
    parts.append(wikitext[position:])
    return "".join(parts)


def wikitext_to_text(wikitext: str) -> str:
    """Plain prose from wikitext: links become their text, headings stay as lines, the rest goes."""
    # Bold/italic quotes are left as text (parsing them builds many nodes) and removed here.
    code = mwparserfromhell.parse(drop_unwanted_markup(wikitext), skip_style_tags=True)
    text = STYLE_QUOTES.sub("", _plain(code))
    lines = [ln for ln in text.split("\n") if not MARKUP_LEFTOVER_LINE.match(ln)]
    return normalize_whitespace(MARKUP_LEFTOVER.sub("", "\n".join(lines)))


def normalize_whitespace(text: str) -> str:
    lines = (SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n"))
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def is_garbage(run: str) -> bool:
    if "_" in run:
        return True
    if len(run) < 2:
        return False
    legacy = [c for c in run if c in LEGACY_HIGH]
    if any(not c.isalpha() and c not in PROSE_PUNCTUATION for c in legacy) or len(legacy) >= 3:
        return True
    return any(a.islower() and b.isupper() for a, b in itertools.pairwise(run))


def _drop_garbage(match: re.Match[str]) -> str:
    run = match.group()
    if not is_garbage(run):
        return run
    # The real character often survives as the run's first one ("don’¢_äŒ_Ü¢t" was "don’t").
    return run[0] if run[0] in PROSE_PUNCTUATION else ""


def repair(text: str) -> tuple[str, list[str]]:
    """Fix what is recoverable (ftfy), drop garbage that is not, normalise; name each repair made."""
    made: list[str] = []
    if (MOJIBAKE_HINT.search(text) and is_bad(text)) or HTML_ENTITY.search(text):
        fixed = ftfy.fix_text(text, normalization="NFC", uncurl_quotes=False)
        if fixed != text:
            made.append("mojibake_fixed")
            text = fixed
    stripped = NON_ASCII_RUN.sub(_drop_garbage, text)
    if stripped != text:
        made.append("garbage_removed")
        text = stripped
    stripped = CONTROL_CHARS.sub("", text)
    if stripped != text:
        made.append("control_removed")
        text = stripped
    normal = unicodedata.normalize("NFC", text)
    if normal != text:
        made.append("nfc")
        text = normal
    return normalize_whitespace(text), made


def has_mojibake(text: str) -> bool:
    """Whether text still looks like mojibake or carries control characters (for the report)."""
    garbage = any(is_garbage(m.group()) for m in NON_ASCII_RUN.finditer(text))
    return bool(garbage or (MOJIBAKE_HINT.search(text) and is_bad(text)) or CONTROL_CHARS.search(text))
