"""One dump line -> its conversations.jsonl.gz row, its share of stats.json and its rejects.

Pure, and small in what it returns: this runs in the worker processes (clean/workers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from cmv_core.cmv.deltas import Delta, find_deltas, op_known, winning_branches
from cmv_core.cmv.threads import BENIGN_SKIPS, LineRejected, Thread, build_thread, parse_line


@dataclass(slots=True)
class LineResult:
    """What cleaning one dump line gives; small, so it travels back from a worker."""

    kind: str  # "thread", "blank" or "reject"
    thread_id: str = ""
    row: bytes = b""  # the conversations.jsonl.gz line
    reason: str = ""  # for a rejected line
    detail: str = ""
    comment_rejects: list[tuple[str, str | None, str]] = field(default_factory=list)  # reason, id, raw JSON
    counts: dict[str, int] = field(default_factory=dict)  # this thread's share of stats.json
    # Read by a worker from a file's byte range (clean_range): the raw text of a rejected line (the rest
    # stays there), and a thread line's (offset, length) in the file, to read back should it be a duplicate.
    raw: bytes = b""
    span: tuple[int, int] | None = None


def conversation_row(thread: Thread, deltas: list[Delta]) -> dict[str, Any]:
    """The output schema for one thread (docs/ARCHITECTURE.md, "Stage outputs"), from a rebuilt thread and its deltas.

    Comment bodies keep their quoted lines: whether training text keeps quotes
    of the other side is the format stage's option (`format.keep_quotes`).
    """
    return {
        "thread_id": thread.thread_id,
        "title": thread.title,
        "op_author": thread.op_author,
        "op_text": thread.op_text,
        "created_utc": thread.created_utc,
        "comments": thread.comments,
        "deltas": [d.to_record() for d in deltas],
        "winning_branches": winning_branches(deltas, thread.comments),
    }


def thread_counts(thread: Thread, n_objects: int, deltas: list[Delta], branches: int) -> dict[str, int]:
    counts = {
        "threads_written": 1,
        "threads_op_deleted": int(not op_known(thread.op_author)),
        "threads_without_comments": int(not thread.comments),
        "threads_with_op_delta": int(any(d.from_op for d in deltas)),
        "threads_with_winning_branch": int(branches > 0),
        "comment_objects": n_objects,
        "comments_kept": len(thread.comments),
        "more_placeholders": thread.more_placeholders,
        "continue_stubs": thread.continue_stubs,
        "winning_branches": branches,
        "op_confirmed": sum(d.from_op and d.confirmed for d in deltas),
        "op_unconfirmed": sum(d.from_op and not d.confirmed for d in deltas),
        "non_op": sum(not d.from_op for d in deltas),
        "non_op_confirmed": sum(not d.from_op and d.confirmed for d in deltas),
        "rejected_by_deltabot": sum(d.rejected_by_deltabot for d in deltas),
    }
    for s in thread.skipped:
        key = "skipped:" + s.reason
        counts[key] = counts.get(key, 0) + 1
    return counts


def clean_line(raw: bytes, strip_delta_edits: bool = True) -> LineResult:
    """One dump line -> its output line and counts, or why it was rejected."""
    if not raw or raw.isspace():
        return LineResult("blank")
    try:
        # Parse and rebuild the tree
        sub = parse_line(raw)
        thread = build_thread(sub, strip_delta_edits=strip_delta_edits)
        # Deltas and winning branches
        deltas = find_deltas(thread.comments, thread.op_author, thread.delta_candidates)
        row = conversation_row(thread, deltas)
    except LineRejected as exc:
        return LineResult("reject", reason=exc.reason, detail=exc.detail)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        # a field of an unexpected type somewhere (say a numeric author): this line only
        return LineResult("reject", reason="malformed_thread", detail=f"{type(exc).__name__}: {exc}")
    comment_rejects = [
        (s.reason, s.comment_id, orjson.dumps(s.raw, default=str).decode())
        for s in thread.skipped
        if s.reason not in BENIGN_SKIPS
    ]
    return LineResult(
        "thread",
        thread_id=thread.thread_id,
        row=orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE),
        comment_rejects=comment_rejects,
        counts=thread_counts(thread, len(sub.get("comments") or ()), deltas, len(row["winning_branches"])),
    )
