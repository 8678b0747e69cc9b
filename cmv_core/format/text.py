"""Cleaning the text of posts and comments for the format stage: quotes, OP edits, delta leaks, blank lines;
and the normalized forms used for deduplication and loser matching."""

from __future__ import annotations

import re
import unicodedata

from cmv_core.cmv.deltas import has_delta_token, might_contain_delta
from cmv_core.cmv.text import remove_delta_edits
from cmv_core.format.config import FormatConfig

DELETED = frozenset({"[deleted]", "[removed]"})

_QUOTE_LINE = re.compile(r"^[ \t]*>")
# "EDIT:", "**Edit 2**:", "Update (later) -", a bare "**Edit**" line, or an all-caps "EDIT ..."; not a
# paragraph that merely starts with the word ("Update cycles are too short.", "Edit history matters.").
_EDIT_START = re.compile(
    r"^[\W_]*(?:(?i:edit|update)\b[\s\d#.*_~]*(?:\([^)\n]*\)[\s*_~]*)?(?:[:\-–—]|$)|(?:EDIT|UPDATE)\b)",
    re.M,
)
_BLANK_RUNS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_WORD = re.compile(r"[a-z0-9']+")


def is_deleted(text: str | None) -> bool:
    return (text or "").strip() in DELETED


def tidy(text: str) -> str:
    """Collapse runs of blank lines left by removals and strip the ends."""
    return _BLANK_RUNS.sub("\n\n", text).strip()


def strip_quotes(text: str) -> str:
    return tidy("\n".join(line for line in text.split("\n") if not _QUOTE_LINE.match(line)))


def strip_edits(text: str) -> str:
    """Drop edit paragraphs; an edit after the first paragraph runs to the end of the post."""
    paragraphs = re.split(r"\n[ \t]*\n", text)
    kept: list[str] = []
    for i, para in enumerate(paragraphs):
        if _EDIT_START.match(para.strip()):
            if i == 0:
                continue  # an edit on top of the post: drop that paragraph only
            break  # edits are appended: everything after the first one is edit text
        kept.append(para)
    return tidy("\n\n".join(kept))


def strip_delta_leaks(text: str) -> str:
    """Remove what announces a delta from a comment: edit blocks that mention a delta or a changed
    view, then every line that still holds a delta token (outside quotes and code, docs/DATA.md)."""
    text = remove_delta_edits(text)
    if not might_contain_delta(text):
        return text
    return tidy("\n".join(line for line in text.split("\n") if not has_delta_token(line)))


def comment_text(body: str, cfg: FormatConfig) -> str:
    if cfg.strip_comment_delta_edits:
        body = strip_delta_leaks(body)
    return tidy(body) if cfg.keep_quotes else strip_quotes(body)


def comments_text(comments: list[dict], cfg: FormatConfig) -> str | None:
    """One author's comments, cleaned and joined by a blank line (the unit of a target or a reply);
    None when any of them is deleted."""
    if any(is_deleted(c["body"]) for c in comments):
        return None
    return tidy("\n\n".join(comment_text(c["body"], cfg) for c in comments))


def normalize(text: str) -> str:
    """Key for exact-duplicate detection: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0
