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
STYLE_QUOTES = re.compile(r"''+")  # not '{2,}: a literal prefix lets the engine skip ahead
COMMENT = re.compile(r"<!--.*?(-->|$)", re.DOTALL)
REF_TAG = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}")
TABLE_TOKEN = re.compile(r"^[ \t]*\{\||^[ \t]*\|\}", re.MULTILINE)
MEDIA_LINK_START = re.compile(r"\[\[\s*:?\s*(file|image|media)\s*:", re.IGNORECASE)
LINK_TOKEN = re.compile(r"\[\[|\]\]")
# A one-line wikilink, [[title]] or [[title|text]], with no link inside: the parser's costliest node
# (its builder is pure Python) and the most common, so it is replaced by its text before parsing.
# The title excludes what makes the parser read the whole as text instead ([]{}<>| and newlines).
SIMPLE_WIKILINK = re.compile(r"\[\[([^\[\]{}<>|\n]*)(?:\|([^\[\]\n]*))?\]\]")
# Headings and list markers (';' definition lines aside) are the next most common nodes; both become
# their line breaks and text as `_plain` renders them. Neither is replaced where what would then start
# a line is markup there (a heading, list, table or rule): the parser handles those few.
HEADING_LINE = re.compile(r"^(={1,6})(.+?)(={1,6})[ \t]*$", re.MULTILINE)
LIST_MARKERS = re.compile(r"^[*#:]++(?![=*#:;{-])", re.MULTILINE)
LINE_START_MARKUP = tuple("=*#:;{-")
DROPPED_TAGS = frozenset(
    {"ref", "references", "table", "gallery", "math", "chem", "score", "timeline", "imagemap",
     "syntaxhighlight", "source", "pre", "nowiki", "templatedata", "graph", "mapframe", "hiero"}
)
LINE_BREAK_TAGS = frozenset({"br", "p", "div", "li", "dd", "dt", "tr"})
# What survives a parse of broken markup: table rows, unmatched template or link braces.
MARKUP_LEFTOVER_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\|\+|!\s)")
MARKUP_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|<ref[^>]*>|</ref>|\{\||\|\}|__[A-Z]+__")
# Whitespace runs that `normalize_whitespace` (SPACES) changes: a lone ' ' is left alone, so one pass
# over the whole text makes far fewer replacements than SPACES does line by line.
_SPACE = r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]"
SPACES_TO_COLLAPSE = re.compile(rf" ?(?:  |[\t\u00a0\u2000-\u200a\u202f\u205f\u3000]){_SPACE}*")

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
    text = SIMPLE_WIKILINK.sub(_link_text, drop_media_links(text))
    text = HEADING_LINE.sub(_heading_text, text)
    return LIST_MARKERS.sub(lambda m: "\n" * len(m.group()), text)


def _link_text(match: re.Match[str]) -> str:
    """What a wikilink shows, as `_plain` renders it: its text, else its title without the anchor;
    nothing for category, media and interlanguage links."""
    title, text = match.groups()
    shown = "" if DROPPED_LINK_PREFIX.match(title) else text or title.split("#")[0]
    # Left to the parser where the text would change the line's structure: start it with markup (or
    # bring what follows the link to its start), add '=' to a heading, or ':' to a definition line.
    string, start = match.string, match.start()
    line_start = string.rfind("\n", 0, start) + 1
    at_head = not string[line_start:start].lstrip("*#:;=")
    if ((at_head and (not shown or shown.startswith(LINE_START_MARKUP)))
            or ("=" in shown and string.startswith("=", line_start))
            or (":" in shown and string.startswith(";", line_start))):
        return match.group()
    return shown


def _heading_text(match: re.Match[str]) -> str:
    left, title, right = match.groups()
    level = min(len(left), len(right))
    title = (left[level:] + title + right[level:]).strip()
    return match.group() if title.startswith(LINE_START_MARKUP) else f"\n{title}\n"


def drop_media_links(wikitext: str) -> str:
    """Remove [[File:...]] / [[Image:...]] blocks, nested links in captions included, before parsing:
    a caption with unbalanced bold/italic quotes makes the parser give up on the whole link."""
    parts: list[str] = []
    position = 0
    for match in MEDIA_LINK_START.finditer(wikitext):
        if match.start() < position:
            continue  # inside a block already removed
        depth, end = 0, len(wikitext)  # an unclosed block runs to the end
        for token in LINK_TOKEN.finditer(wikitext, match.start()):
            depth += 1 if token.group() == "[[" else -1
            if depth == 0:
                end = token.end()
                break
        parts.append(wikitext[position : match.start()])
        position = end
    parts.append(wikitext[position:])
    return "".join(parts)


def wikitext_to_text(wikitext: str) -> str:
    """Plain prose from wikitext: links become their text, headings stay as lines, the rest goes."""
    # Bold/italic quotes are left as text (parsing them builds many nodes) and removed here.
    code = mwparserfromhell.parse(drop_unwanted_markup(wikitext), skip_style_tags=True)
    text = STYLE_QUOTES.sub("", _plain(code))
    text = "\n".join(ln for ln in text.split("\n") if not MARKUP_LEFTOVER_LINE.match(ln))
    # normalize_whitespace, exactly (a '\r' before '\n' is stripped with the line), in fewer passes
    text = SPACES_TO_COLLAPSE.sub(" ", MARKUP_LEFTOVER.sub("", text))
    return BLANK_LINES.sub("\n\n", "\n".join(ln.strip() for ln in text.split("\n"))).strip()


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
