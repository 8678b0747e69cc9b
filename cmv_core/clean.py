"""The clean stage: raw CMV dump -> conversations with deltas and winning branches.

`cmv clean --input <dump file, directory or URI> [--input ...] --output <dir or URI>`

Streams the dump one thread (line) at a time, so memory stays bounded by the
largest thread whatever the input size. Writes, under the output:
- `conversations.jsonl.gz`: one thread a line (DESIGN.md "Stage outputs"),
  in input order;
- `rejects.jsonl.gz`: every unusable line or comment object with file, line
  number, reason and the raw text;
- `stats.json`: counts, and reasons for everything skipped;
- `_SUCCESS` last (storage.finish_stage).
The run fails only when the rejected lines exceed `clean.max_reject_fraction`.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import logging
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from cmv_core import reddit, storage
from cmv_core.config import load_recipe, section, to_dict
from cmv_core.deltas import Delta, find_deltas, op_known, winning_branches

log = logging.getLogger(__name__)

CONVERSATIONS = "conversations.jsonl.gz"
REJECTS = "rejects.jsonl.gz"
STATS = "stats.json"


@dataclass
class CleanConfig:
    # Fail the stage when more than this fraction of the non-blank input lines
    # cannot be used as threads (malformed JSON, no id, duplicates, ...).
    max_reject_fraction: float = 0.01
    # Drop "EDIT: ... delta ..." blocks from the OP text: they were written after
    # the view changed and would leak the outcome into the prompt.
    strip_delta_edits: bool = True


class TooManyRejectsError(RuntimeError):
    """More input lines were rejected than `clean.max_reject_fraction` allows."""


# --- CLI ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", action="extend", nargs="+", required=True, metavar="URI",
        help="raw dump: a .jsonlist file (plain, .gz or .bz2), a directory/prefix of them, "
        "or several (repeat --input or list them); read in the order given",
    )
    parser.add_argument("--output", required=True, metavar="URI", help="output directory or s3:// prefix")


def cli_main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config, args.set)
    config = section(recipe, "clean", CleanConfig)
    try:
        run_clean(args.input, args.output, config, run_id=args.run_id, force=args.force)
    except TooManyRejectsError as exc:
        print(f"cmv clean: error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- one thread (pure) ------------------------------------------------------------------


def conversation_row(thread: reddit.Thread, deltas: list[Delta]) -> dict[str, Any]:
    """The output schema for one thread (DESIGN.md), from a rebuilt thread and its deltas.

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


# --- stats --------------------------------------------------------------------------------


@dataclass
class _Counts:
    lines_read: int = 0
    blank_lines: int = 0
    threads_written: int = 0
    threads_op_deleted: int = 0
    threads_without_comments: int = 0
    threads_with_op_delta: int = 0
    threads_with_winning_branch: int = 0
    comment_objects: int = 0
    comments_kept: int = 0
    more_placeholders: int = 0
    continue_stubs: int = 0
    op_confirmed: int = 0
    op_unconfirmed: int = 0
    non_op: int = 0
    non_op_confirmed: int = 0
    rejected_by_deltabot: int = 0
    winning_branches: int = 0

    def __post_init__(self) -> None:
        self.rejected_lines: Counter[str] = Counter()
        self.skipped_comments: Counter[str] = Counter()
        self.lines_per_file: dict[str, int] = {}

    def add_thread(self, thread: reddit.Thread, n_objects: int, deltas: list[Delta], branches: int) -> None:
        self.threads_written += 1
        self.threads_op_deleted += not op_known(thread.op_author)
        self.threads_without_comments += not thread.comments
        self.comment_objects += n_objects
        self.comments_kept += len(thread.comments)
        self.more_placeholders += thread.more_placeholders
        self.continue_stubs += thread.continue_stubs
        for s in thread.skipped:
            self.skipped_comments[s.reason] += 1
        for d in deltas:
            if d.from_op:
                self.op_confirmed += d.confirmed
                self.op_unconfirmed += not d.confirmed
            else:
                self.non_op += 1
                self.non_op_confirmed += d.confirmed
            self.rejected_by_deltabot += d.rejected_by_deltabot
        self.threads_with_op_delta += any(d.from_op for d in deltas)
        self.threads_with_winning_branch += branches > 0
        self.winning_branches += branches

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected_lines.values())

    def to_stats(self, config: CleanConfig) -> dict[str, Any]:
        read = self.lines_read
        return {
            "files": [{"uri": u, "lines": n} for u, n in self.lines_per_file.items()],
            "lines": {
                "read": read,
                "blank": self.blank_lines,
                "threads_written": self.threads_written,
                "rejected": self.rejected_total,
            },
            "rejected_lines_by_reason": dict(sorted(self.rejected_lines.items())),
            "reject_fraction": round(self.rejected_total / read, 6) if read else 0.0,
            "max_reject_fraction": config.max_reject_fraction,
            "threads": {
                "written": self.threads_written,
                "op_deleted": self.threads_op_deleted,
                "without_comments": self.threads_without_comments,
                "with_op_delta": self.threads_with_op_delta,
                "with_winning_branch": self.threads_with_winning_branch,
            },
            "comments": {
                "objects": self.comment_objects,
                "kept": self.comments_kept,
                "more_placeholders": self.more_placeholders,
                "continue_stubs": self.continue_stubs,
                "skipped_by_reason": dict(sorted(self.skipped_comments.items())),
            },
            "deltas": {
                "op_confirmed": self.op_confirmed,
                "op_unconfirmed": self.op_unconfirmed,
                "non_op": self.non_op,
                "non_op_confirmed": self.non_op_confirmed,
                "rejected_by_deltabot": self.rejected_by_deltabot,
            },
            "winning_branches": self.winning_branches,
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
    )


def _reject_record(line: reddit.Line, reason: str, detail: str = "", **extra: Any) -> bytes:
    rec = {"file": line.file, "line": line.number, "reason": reason, "detail": detail, **extra}
    if "raw" not in rec:
        rec["raw"] = line.raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return orjson.dumps(rec) + b"\n"


# --- output ---------------------------------------------------------------------------------


class BackgroundGzip:
    """A write-only gzip stream compressed on a second thread, in order.

    Compressing the conversations is the costliest part of the stage after
    parsing. zlib releases the GIL while it compresses, so doing it on another
    thread overlaps it with parsing instead of adding to it. Level 1 is several
    times faster than the default 6 for a slightly bigger file; `mtime=0` and no
    file name in the header, so the same content always gives the same bytes.
    Memory is bounded by `depth` chunks of `chunk_bytes`.
    """

    def __init__(self, raw: IO[bytes], level: int = 1, chunk_bytes: int = 4 << 20, depth: int = 4):
        self._gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=level)
        self._chunk_bytes = chunk_bytes
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._parts: list[bytes] = []
        self._size = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="gzip-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self._chunk_bytes:
            self._hand_off()

    def _hand_off(self) -> None:
        if self._error is not None:
            raise self._error
        if self._parts:
            self._queue.put(b"".join(self._parts))
            self._parts, self._size = [], 0

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:  # after an error, keep draining so the producer never blocks
                try:
                    self._gz.write(chunk)
                except BaseException as exc:  # noqa: BLE001 - re-raised on the producer's thread
                    self._error = exc

    def close(self) -> None:
        self._hand_off()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._gz.close()

    def abort(self) -> None:
        self._parts = []
        self._queue.put(None)
        self._thread.join()


@contextlib.contextmanager
def open_gzip_output(output: str, name: str) -> Iterator[BackgroundGzip]:
    """Write `<output>/<name>` through a BackgroundGzip; published only if the block exits
    cleanly (written to a local temp dir, then storage.upload_dir: os.replace locally,
    one upload on S3)."""
    tmp = tempfile.mkdtemp(prefix="cmv-clean-")
    try:
        with open(Path(tmp) / name, "wb") as raw:
            writer = BackgroundGzip(raw)
            try:
                yield writer
            except BaseException:
                writer.abort()
                raise
            writer.close()
        storage.upload_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the stage ------------------------------------------------------------------------------


def run_clean(
    inputs: list[str], output: str, config: CleanConfig, run_id: str | None = None, force: bool = False
) -> dict | None:
    """Run the clean stage; returns stats.json's content, or None when skipped (manifest matched)."""
    from tqdm import tqdm

    run = storage.begin_stage(
        "clean", output, inputs=list(inputs), config=to_dict(config), run_id=run_id, force=force, raw_inputs=True
    )
    if run is None:
        return None
    started = time.monotonic()

    # Load: expand directories, stream lines
    files = reddit.expand_inputs(inputs)
    counts = _Counts()
    counts.lines_per_file = {f: 0 for f in files}
    seen: set[str] = set()
    failure: TooManyRejectsError | None = None
    rejects_uri = storage.join(output, REJECTS)
    conversations_uri = storage.join(output, CONVERSATIONS)

    with storage.open_write(rejects_uri, "wb") as rejects:
        try:
            with open_gzip_output(output, CONVERSATIONS) as out:
                progress = tqdm(reddit.iter_lines(files), unit=" threads", mininterval=2.0, desc="clean")
                for line in progress:
                    if line.error is not None:
                        counts.lines_read += 1
                        counts.rejected_lines["unreadable_stream"] += 1
                        rejects.write(_reject_record(line, "unreadable_stream", line.error))
                        continue
                    counts.lines_per_file[line.file] = line.number
                    raw = line.raw
                    if not raw or raw.isspace():
                        counts.blank_lines += 1
                        continue
                    counts.lines_read += 1

                    # Parse and rebuild the tree
                    try:
                        sub = reddit.parse_line(raw)
                        tid = reddit.thread_id_of(sub)
                        if tid in seen:
                            raise reddit.LineRejected("duplicate_thread", f"thread {tid} already read")
                        thread = reddit.build_thread(sub, strip_delta_edits=config.strip_delta_edits)
                    except reddit.LineRejected as exc:
                        counts.rejected_lines[exc.reason] += 1
                        rejects.write(_reject_record(line, exc.reason, exc.detail))
                        continue
                    seen.add(tid)
                    for s in thread.skipped:
                        if s.reason not in reddit.BENIGN_SKIPS:
                            rejects.write(
                                _reject_record(
                                    line, s.reason, level="comment", thread_id=tid, comment_id=s.comment_id,
                                    raw=orjson.dumps(s.raw, default=str).decode(),
                                )
                            )

                    # Deltas and winning branches
                    deltas = find_deltas(thread.comments, thread.op_author)
                    row = conversation_row(thread, deltas)

                    # Write
                    out.write(orjson.dumps(row) + b"\n")
                    counts.add_thread(thread, len(sub.get("comments") or ()), deltas, len(row["winning_branches"]))
                progress.close()

                # Check: fail (and publish no conversations) above the reject limit
                if counts.lines_read == 0:
                    failure = TooManyRejectsError(f"no thread lines found in {', '.join(files)}")
                    raise failure
                fraction = counts.rejected_total / counts.lines_read
                if fraction > config.max_reject_fraction:
                    reasons = ", ".join(f"{k} {v}" for k, v in counts.rejected_lines.most_common())
                    failure = TooManyRejectsError(
                        f"{counts.rejected_total:,} of {counts.lines_read:,} input lines ({fraction:.2%}) were "
                        f"rejected, above clean.max_reject_fraction={config.max_reject_fraction} "
                        f"(reasons: {reasons}). Each rejected line is in {rejects_uri} with its file, line "
                        f"number and reason. Fix the input, or raise the limit with "
                        f"--set clean.max_reject_fraction=<fraction>."
                    )
                    raise failure
        except TooManyRejectsError:
            pass  # conversations discarded; rejects and stats still written for diagnosis

    stats = counts.to_stats(config)
    storage.write_json(storage.join(output, STATS), stats)
    if failure is not None:
        raise failure

    # Finish: _SUCCESS last
    summary = {
        "threads_written": counts.threads_written,
        "lines_rejected": counts.rejected_total,
        "comments_kept": counts.comments_kept,
        "deltas": stats["deltas"],
        "winning_branches": counts.winning_branches,
    }
    storage.finish_stage(run, summary)
    seconds = time.monotonic() - started
    print(summary_text(stats, output, seconds), flush=True)
    log.info("clean: wrote %d threads to %s in %.1f s", counts.threads_written, conversations_uri, seconds)
    return stats
