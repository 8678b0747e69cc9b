"""What a run reports: stats.json, the printed summary, the rejects file's records, the reject limit."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson

from cmv_core.clean.config import CleanConfig
from cmv_core.cmv.dump import Line
from cmv_core.errors import InputError

DELTA_KINDS = ("op_confirmed", "op_unconfirmed", "non_op", "non_op_confirmed", "rejected_by_deltabot")
PUSHSHIFT_KEYS = ("submissions", "comments", "duplicate_submissions", "duplicate_comments", "orphan_comments")


class TooManyRejectsError(InputError):
    """More input lines were rejected than `clean.max_reject_fraction` allows (or none read)."""


def make_stats(totals: Counter[str], lines_per_file: dict[str, int], config: CleanConfig) -> dict[str, Any]:
    """stats.json from the summed counts."""
    read = totals["lines_read"]
    rejected = {k.split(":", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("rejected:")}
    skipped = {k.split(":", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("skipped:")}
    n_rejected = sum(rejected.values())
    return {
        "files": [{"uri": u, "lines": n} for u, n in lines_per_file.items()],
        "lines": {
            "read": read,
            "blank": totals["blank_lines"],
            "threads_written": totals["threads_written"],
            "rejected": n_rejected,
        },
        "rejected_lines_by_reason": rejected,
        "reject_fraction": round(n_rejected / read, 6) if read else 0.0,
        "max_reject_fraction": config.max_reject_fraction,
        "threads": {
            "written": totals["threads_written"],
            "op_deleted": totals["threads_op_deleted"],
            "without_comments": totals["threads_without_comments"],
            "with_op_delta": totals["threads_with_op_delta"],
            "with_winning_branch": totals["threads_with_winning_branch"],
        },
        "comments": {
            "objects": totals["comment_objects"],
            "kept": totals["comments_kept"],
            "more_placeholders": totals["more_placeholders"],
            "continue_stubs": totals["continue_stubs"],
            "skipped_by_reason": skipped,
        },
        "deltas": {k: totals[k] for k in DELTA_KINDS},
        "winning_branches": totals["winning_branches"],
        **(
            {"pushshift": {k: totals["pushshift:" + k] for k in PUSHSHIFT_KEYS}}
            if "pushshift:submissions" in totals
            else {}
        ),
    }


def summary_text(stats: dict[str, Any], output: str, seconds: float) -> str:
    """The one-screen summary printed at the end of a run."""
    lines, th, cm, dl = stats["lines"], stats["threads"], stats["comments"], stats["deltas"]
    reasons = ", ".join(f"{k} {v}" for k, v in stats["rejected_lines_by_reason"].items()) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in cm["skipped_by_reason"].items()) or "none"
    return "\n".join(
        [
            f"clean: {output}  ({seconds:.1f} s)",
            f"  lines read        {lines['read']:>10,}   blank {lines['blank']:,}",
            f"  threads written   {lines['threads_written']:>10,}   OP deleted {th['op_deleted']:,}, "
            f"no comments {th['without_comments']:,}",
            f"  lines rejected    {lines['rejected']:>10,}   ({stats['reject_fraction']:.2%}; "
            f"limit {stats['max_reject_fraction']:.2%}): {reasons}",
            f"  comment objects   {cm['objects']:>10,}   kept {cm['kept']:,}, 'more' placeholders "
            f"{cm['more_placeholders']:,}, '_' stubs {cm['continue_stubs']:,}",
            f"  comments skipped  {sum(cm['skipped_by_reason'].values()):>10,}   {skipped}",
            f"  OP deltas         {dl['op_confirmed']:>10,} confirmed, {dl['op_unconfirmed']:,} unconfirmed "
            f"(threads with an OP delta: {th['with_op_delta']:,})",
            f"  non-OP deltas     {dl['non_op']:>10,}   ({dl['non_op_confirmed']:,} confirmed)",
            f"  DeltaBot rejected {dl['rejected_by_deltabot']:>10,}",
            f"  winning branches  {stats['winning_branches']:>10,}   in {th['with_winning_branch']:,} threads",
        ]
        + (
            [
                f"  pushshift records {ps['submissions']:>10,} submissions, {ps['comments']:,} comments; duplicates "
                f"{ps['duplicate_submissions']:,} / {ps['duplicate_comments']:,}, orphan comments "
                f"{ps['orphan_comments']:,}"
            ]
            if (ps := stats.get("pushshift"))
            else []
        )
    )


def reject_record(line: Line, reason: str, detail: str = "", **extra: Any) -> bytes:
    """One line of rejects.jsonl.gz: where, why, and the raw text (the line's own unless `raw` is given)."""
    rec = {"file": line.file, "line": line.number, "reason": reason, "detail": detail, **extra}
    if "raw" not in rec:
        rec["raw"] = line.raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)


def check_rejects(stats: dict[str, Any], files: list[str], rejects_uri: str, first: list[str] | None = None) -> None:
    """Raise TooManyRejectsError when nothing was read or rejects exceed the limit.

    `first`: "file:line: reason (detail)" for the first rejected lines, named in the message."""
    read, rejected = stats["lines"]["read"], stats["lines"]["rejected"]
    if read == 0:
        raise TooManyRejectsError(f"no thread lines found in {', '.join(files)}")
    records = stats.get("pushshift")
    if records is not None and records["submissions"] == 0:
        raise TooManyRejectsError(
            f"no Pushshift submission records in {', '.join(files)} ({records['comments']:,} comment records, "
            f"all orphans): pass the submissions file too"
        )
    limit = stats["max_reject_fraction"]
    if rejected / read > limit:
        reasons = ", ".join(f"{k} {v}" for k, v in stats["rejected_lines_by_reason"].items())
        raise TooManyRejectsError(
            f"{rejected:,} of {read:,} input lines ({rejected / read:.2%}) were rejected, above "
            f"clean.max_reject_fraction={limit} (reasons: {reasons}). "
            + (f"First rejected: {'; '.join(first)}. " if first else "")
            + f"Each rejected line is in {rejects_uri} "
            f"with its file, line number and reason. Fix the input, or raise the limit with "
            f"--set clean.max_reject_fraction=<fraction>."
        )
