"""Pure text cleaners for the offline corpus: no I/O, no third-party imports.

Each function turns one raw source format into plain English prose:

* :func:`brown_to_text` — Brown corpus "form C" (``The/at jury/nn said/vbd ./.``) to detokenized text.
* :func:`wikitext_to_text` — MediaWiki markup (templates, links, refs, tables) to plain paragraphs.
* :func:`iter_wiki_pages` — ``(title, wikitext)`` of article pages in a MediaWiki XML export.
* :func:`normalize_whitespace` — shared tidy-up (line endings, trailing spaces, blank-line runs).
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from typing import BinaryIO, Iterator

# --------------------------------------------------------------------------------------------
# whitespace


_BLANK_RUNS = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def normalize_whitespace(text: str) -> str:
    """Unix line endings, no trailing spaces, at most one blank line in a row, stripped ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


# --------------------------------------------------------------------------------------------
# Brown corpus


def strip_brown_tags(tagged: str) -> list[str]:
    """Words of a Brown "form C" text with their ``/tag`` suffixes removed.

    The tag is whatever follows the *last* slash (``1/2/cd`` is the word ``1/2``); a token
    without a slash is kept as it is.
    """
    return [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in tagged.split()]


_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}%]|'(?=\s|$)|''|n't\b|'s\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]|``) ")


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens into ordinary text.

    Removes the space before closing punctuation and after opening brackets, turns the Brown
    quote tokens ````` / ``''`` into plain double quotes, and drops a sentence-final ``.`` that
    follows an abbreviation's own dot (``Jr. .`` becomes ``Jr.``).
    """
    kept = [
        w for i, w in enumerate(words) if not (w == "." and i and words[i - 1].endswith(".") and words[i - 1] != "...")
    ]
    text = " ".join(kept)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    return text.replace("``", '"').replace("''", '"')


def brown_to_text(tagged: str) -> str:
    """One Brown corpus file (tagged, one sentence per tab-indented line) as plain text.

    Sentences of the file are joined into a single paragraph, in order.
    """
    sentences = [detokenize(strip_brown_tags(line)) for line in tagged.splitlines() if line.strip()]
    return " ".join(s for s in sentences if s)


# --------------------------------------------------------------------------------------------
# Wikipedia (MediaWiki XML export + wikitext)


def iter_wiki_pages(stream: BinaryIO) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` for each main-namespace, non-redirect page of a MediaWiki export."""
    for _event, elem in ET.iterparse(stream, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = elem.find("{*}ns")
        title = elem.find("{*}title")
        text = elem.find("{*}revision/{*}text")
        is_redirect = elem.find("{*}redirect") is not None
        if ns is not None and ns.text == "0" and not is_redirect and title is not None and text is not None:
            yield title.text or "", text.text or ""
        elem.clear()


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF_PAIR = re.compile(r"<ref\b[^>/]*>.*?</ref\s*>", re.S | re.I)
_REF_SINGLE = re.compile(r"<ref\b[^>]*/>", re.I)
_DROP_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|chem)\b[^>]*>.*?</\1\s*>", re.S | re.I
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?: ([^\]]*))?\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
_BEHAVIOUR_SWITCH = re.compile(r"__[A-Z]+__")
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "template:", "help:")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")
#: sections that carry no prose; everything from the first of these headings on is dropped
END_SECTIONS = frozenset(
    {
        "references",
        "external links",
        "see also",
        "further reading",
        "notes",
        "bibliography",
        "sources",
        "footnotes",
        "citations",
    }
)


def _remove_nested(pattern: re.Pattern[str], text: str) -> str:
    """Delete innermost matches of ``pattern`` until none are left (handles nesting)."""
    while True:
        new = pattern.sub("", text)
        if new == text:
            return text
        text = new


def _replace_link(match: re.Match[str]) -> str:
    inner = match.group(1)
    target = inner.split("|", 1)[0].strip().lower()
    if target.startswith(_DROPPED_LINK_PREFIXES) or _INTERWIKI.match(target):
        return ""
    return inner.rsplit("|", 1)[-1]


def _cut_end_sections(text: str) -> str:
    for match in _HEADING.finditer(text):
        if match.group(2).strip().lower() in END_SECTIONS:
            return text[: match.start()]
    return text


def wikitext_to_text(wikitext: str) -> str:
    """Plain prose from MediaWiki markup.

    Drops comments, references, templates (infoboxes, citations), tables, files, categories,
    interlanguage links, math and the trailing reference sections; keeps link labels, headings
    (as their own lines) and list items' text. Not a full parser: good enough for language
    modelling text, which is all it is used for.
    """
    text = html.unescape(wikitext)
    text = _COMMENT.sub("", text)
    text = _REF_PAIR.sub("", text)
    text = _REF_SINGLE.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _remove_nested(_TABLE, text)
    text = _cut_end_sections(text)
    while True:  # innermost links first, so a file caption's own links do not leak out
        new = _LINK.sub(_replace_link, text)
        if new == text:
            break
        text = new
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _BEHAVIOUR_SWITCH.sub("", text)
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARKER.sub("", text)
    lines = [line.strip() for line in text.split("\n")]
    # drop leftover markup-only lines (stray table/template fragments)
    lines = [line for line in lines if not line.startswith(("|", "!", "{", "}"))]
    text = "\n".join(lines).replace("\u00a0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "( )" left behind by removed templates
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r" ([,.;:])", r"\1", text)
    return normalize_whitespace(text)
