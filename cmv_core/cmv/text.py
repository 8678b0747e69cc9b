"""Clean the dump's text: HTML entities, the moderators' footnote, "EDIT: ... delta" blocks.

The rules are docs/DATA.md's "Text cleaning". Pure functions over one string; the format stage
reuses remove_delta_edits on challengers' comments.
"""

from __future__ import annotations

import html
import re

from cmv_core.cmv.deltas import has_delta_token

# An entity left after one unescape: the text was escaped twice (`&amp;#8710;` -> `&#8710;`).
_ENTITY_LEFT = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|amp|lt|gt|quot|apos|nbsp);")


def unescape(text: str) -> str:
    """Undo the dump's HTML escaping (`&gt;` `&amp;` `&lt;` `&#8710;`), and a second layer where
    the text was escaped twice: `&amp;#8710;` ends as `∆`, not `&#8710;` (seen in real comments).

    (html.unescape measured faster here than chains of str.replace guarded to
    give the same result.)
    """
    if "&" not in text:
        return text
    text = html.unescape(text)
    if "&" in text and _ENTITY_LEFT.search(text):
        text = html.unescape(text)
    return text


_FOOTNOTE = re.compile(r"^.*Hello,? users of CMV! This is a footnote from your moderators", re.M | re.I)
_TRAILING_JUNK = re.compile(r"(?:\n[ \t]*(?:(?:>|_{3,}|-{3,}|\*{3,})[ \t]*)?)+\Z")


def remove_footnote(text: str) -> str:
    """Cut the moderators' footnote (from its line to the end of the post) and the
    rule / empty quote lines that lead into it."""
    if "footnote from your moderators" not in text:  # skip the regex for most posts
        return text
    m = _FOOTNOTE.search(text)
    if m is None:
        return text
    head = text[: m.start()]
    return _TRAILING_JUNK.sub("", "\n" + head)[1:].rstrip()


_BLANKS = re.compile(r"\n{3,}")


# (no two adjacent quantifiers share characters: a line of spaces after "Edit" stays linear)
_EDIT_START = re.compile(r"^[\s*_#~]*(?:edit|update)[\s#\d]*(?:[*_]+\s*)?[:\-\u2013\u2014]", re.I)
_ANNOUNCES = re.compile(r"delta|changed my (?:view|mind)|view (?:has been |was |is |got )?changed|\bcmv'?d\b", re.I)


def remove_delta_edits(text: str) -> str:
    """Drop "EDIT: ..." / "Update 2: ..." blocks that announce a delta or a changed view.

    A block runs from a line starting with the edit marker to the next blank
    line. Such edits were written after the view changed, so they leak the
    outcome into a prompt. Other edits ("EDIT: formatting") stay.
    """
    low = text.lower()
    if ("edit" not in low and "update" not in low) or (not _ANNOUNCES.search(text) and not has_delta_token(text)):
        return text
    lines = text.split("\n")
    keep: list[str] = []
    i = 0
    while i < len(lines):
        if _EDIT_START.match(lines[i]):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            block = "\n".join(lines[i:j])
            if _ANNOUNCES.search(block) or has_delta_token(block):
                i = j
                continue
        keep.append(lines[i])
        i += 1
    return _BLANKS.sub("\n\n", "\n".join(keep)).strip()


def clean_op_text(selftext: str, *, strip_delta_edits: bool) -> str:
    text = remove_footnote(unescape(selftext))
    if strip_delta_edits:
        text = remove_delta_edits(text)
    return text.strip()
