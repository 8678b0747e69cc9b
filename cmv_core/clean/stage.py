"""The clean stage: raw CMV dump -> conversations with deltas and winning branches.

`cmv clean --input <dump file, directory or URI> [--input ...] --output <dir or URI>`

Streams the dump one line (one Reddit thread) at a time; memory is bounded by
a few batches of lines whatever the input size. Writes, under the output:
- `conversations.jsonl.gz`: one thread a line (DESIGN.md "Stage outputs"),
  in input order;
- `rejects.jsonl.gz`: every unusable line or comment object with file, line
  number, reason and the raw text;
- `stats.json`: counts, and reasons for everything skipped;
- `_SUCCESS` last (storage.finish_stage).
The run fails only when the rejected lines exceed `clean.max_reject_fraction`.

Pushshift exports (`cmv clean --input <submissions file> --input <comments file>`, `.zst` as
distributed or `.gz`/`.bz2`/plain, in
any order, or a directory holding both): files whose records are separate Reddit API
submissions (`title`, no `comments`) and comments (`body` and `link_id`) are told from a
Cornell dump by content (reddit.sniff_file). Their records are deduplicated by id (the
later `retrieved_on` wins, else the one read later) and grouped by `link_id` in an
sqlite file in a temporary directory (under $CMV_SCRATCH if set; about the size of the
decompressed inputs), not in memory: one Cornell-format thread line per submission,
in order of first appearance, its comments by time then id, then cleaned exactly as a
dump line. stats.json gains a `pushshift` section (records, duplicates, orphan comments);
a comment whose submission is not in the inputs goes to the rejects as
`orphan_comment` but does not count against the reject limit (a comments file may span
more threads than the submissions given); `lines.read` counts record lines. Mixing a
Cornell dump with Pushshift files in one run is refused (InputError): clean them
separately.

Speed: parsing and rebuilding threads is pure Python work per comment, so it
runs in worker processes on batches of lines (`clean.workers`), results taken
back in input order; compression runs on a thread. A plain local dump is not
read here at all: each worker reads, hashes and parses its own line-aligned
byte range of the file (storage.raw_chunks), so the dump never goes through a
pipe; compressed and S3 inputs stream through this process to the workers.
The output bytes do not depend on the number of workers nor on the path.
benchmarks/bench_clean.py measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import io
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from cmv_core import storage
from cmv_core.cmv import reddit
from cmv_core.cmv.deltas import Delta, find_deltas, op_known, winning_branches
from cmv_core.config import load_recipe, section, to_dict
from cmv_core.errors import InputError

log = logging.getLogger(__name__)

CONVERSATIONS = "conversations.jsonl.gz"
REJECTS = "rejects.jsonl.gz"
STATS = "stats.json"
AUTO_SERIAL_BYTES = 64 << 20  # with workers: 0, smaller inputs are cleaned in-process
MESSAGE_REJECTS = 3  # rejected lines named (file:line: reason) in the reject-limit error


@dataclass
class CleanConfig:
    # Fail the stage when more than this fraction of the non-blank input lines
    # cannot be used as threads (malformed JSON, no id, duplicates, ...).
    max_reject_fraction: float = 0.01
    # Drop "EDIT: ... delta ..." blocks from the OP text: they were written after
    # the view changed and would leak the outcome into the prompt.
    strip_delta_edits: bool = True
    # Processes that parse and rebuild threads. 0: one per usable CPU (at most 4),
    # or none for inputs under 64 MB; 1: everything in this process. The output
    # is byte-identical whatever the number.
    workers: int = 0


class TooManyRejectsError(InputError):
    """More input lines were rejected than `clean.max_reject_fraction` allows (or none read)."""


# --- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        action="extend",
        nargs="+",
        required=True,
        metavar="URI",
        help="raw dump: a .jsonlist file (plain, .gz, .bz2 or .zst), a directory/prefix of them, "
        "or several (repeat --input or list them); read in the order given. Or Pushshift exports: "
        "a submissions file and a comments file (one record a line), in any order, joined by link_id",
    )
    parser.add_argument("--output", required=True, metavar="URI", help="output directory or s3:// prefix")


def cli_main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config, args.set)
    config = section(recipe, "clean", CleanConfig)
    run_clean(args.input, args.output, config, run_id=args.run_id, force=args.force)
    return 0


# --- one line (pure; runs in worker processes) ------------------------------------------------------


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


def thread_counts(thread: reddit.Thread, n_objects: int, deltas: list[Delta], branches: int) -> dict[str, int]:
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
        sub = reddit.parse_line(raw)
        thread = reddit.build_thread(sub, strip_delta_edits=strip_delta_edits)
        # Deltas and winning branches
        deltas = find_deltas(thread.comments, thread.op_author, thread.delta_candidates)
        row = conversation_row(thread, deltas)
    except reddit.LineRejected as exc:
        return LineResult("reject", reason=exc.reason, detail=exc.detail)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        # a field of an unexpected type somewhere (say a numeric author): this line only
        return LineResult("reject", reason="malformed_thread", detail=f"{type(exc).__name__}: {exc}")
    comment_rejects = [
        (s.reason, s.comment_id, orjson.dumps(s.raw, default=str).decode())
        for s in thread.skipped
        if s.reason not in reddit.BENIGN_SKIPS
    ]
    return LineResult(
        "thread",
        thread_id=thread.thread_id,
        row=orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE),
        comment_rejects=comment_rejects,
        counts=thread_counts(thread, len(sub.get("comments") or ()), deltas, len(row["winning_branches"])),
    )


def _digest_of(parts: Iterable[bytes]) -> bytes:
    """storage.chunk_hash of the parts, in order (few, large updates: no joined copy)."""
    digest = storage.chunk_hash()
    for part in parts:
        digest.update(part)
    return digest.digest()


def clean_batch(raws: list[bytes], strip_delta_edits: bool) -> tuple[list[LineResult], bytes]:
    """The batch's results, and the hash of its bytes: the dump's fingerprint is hashed here, in the
    workers, while it streams (storage.raw_fingerprint defines it: a hash of line-aligned chunks)."""
    return [clean_line(raw, strip_delta_edits) for raw in raws], _digest_of(raws)


def clean_range(uri: str, start: int, end: int, strip_delta_edits: bool) -> tuple[list[LineResult], bytes] | str:
    """clean_batch of the lines in bytes [start, end) of a plain local file (a storage.raw_chunks
    chunk), read here: a worker reads its own part of the dump, which so never goes through the
    parent and a pipe. Each result carries what the parent may need of its line (LineResult.raw,
    .span). A read that fails gives the error's text (the parent rejects the rest of the file)."""
    try:
        data = storage.read_range(uri, start, end)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    results = []
    offset = start
    for raw in io.BytesIO(data):  # lines end at b"\n" only, as when a file streams
        res = clean_line(raw, strip_delta_edits)
        if res.kind == "thread":
            res.span = (offset, len(raw))
        elif res.kind == "reject":
            res.raw = raw
        offset += len(raw)
        results.append(res)
    return results, _digest_of((data,))


# --- lines in, results out, in order ------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive the stage (SIGKILL of the stage leaves no orphans): the kernel kills
    it when its parent dies (Linux prctl PR_SET_PDEATHSIG); elsewhere a watcher thread polls."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker_init(parent: int) -> None:
    _die_with_parent(parent)
    # Parsed JSON holds no reference cycles: reference counting frees every thread,
    # and the cyclic collector would only rescan millions of short-lived dicts.
    gc.disable()


def _batches(lines: Iterable[reddit.Line]) -> Iterator[list[reddit.Line]]:
    """Consecutive lines of one file, a batch ending at the first line end at or past
    storage.RAW_CHUNK_BYTES (a fingerprint chunk); a broken-stream line is a batch of its own."""
    batch: list[reddit.Line] = []
    size = 0
    for line in lines:
        if batch and line.file != batch[-1].file:
            yield batch
            batch, size = [], 0
        if line.error is not None:
            if batch:
                yield batch
            yield [line]
            batch, size = [], 0
            continue
        batch.append(line)
        size += len(line.raw)
        if size >= storage.RAW_CHUNK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# A task: (what it is, the function, its arguments), or (what it is, None, (its result,)).
Task = tuple[tuple, Callable[..., Any] | None, tuple]


def _in_order(tasks: Iterable[Task], workers: int) -> Iterator[tuple[tuple, Any]]:
    """(what, result) of every task, in order: run in `workers` processes (in this process when
    workers <= 1), at most 2 tasks per worker in flight (memory: a few chunks a worker)."""
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork while the writer thread runs
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    window: deque[tuple[tuple, Future]] = deque()
    try:
        for what, fn, args in tasks:
            future: Future
            if fn is not None and pool is not None:
                future = pool.submit(fn, *args)
            else:
                future = Future()
                future.set_result(fn(*args) if fn is not None else args[0])
            window.append((what, future))
            while len(window) > (2 * workers if pool is not None else 0):
                what, future = window.popleft()
                yield what, future.result()
        while window:
            what, future = window.popleft()
            yield what, future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _ranged(uri: str) -> bool:
    """Read by byte ranges in the workers (a plain local file), else streamed through this process."""
    return storage.plain_local(uri)


def _line_tasks(lines: Iterable[reddit.Line], strip_delta_edits: bool) -> Iterator[Task]:
    for batch in _batches(lines):
        if batch[0].error is not None:
            broken = LineResult("reject", reason="unreadable_stream", detail=batch[0].error)
            yield ("lines", batch), None, ([broken],)
        else:
            yield ("lines", batch), clean_batch, ([ln.raw for ln in batch], strip_delta_edits)


def _file_tasks(files: list[str], strip_delta_edits: bool) -> Iterator[Task]:
    for index, uri in enumerate(files):
        if not _ranged(uri):
            yield from _line_tasks(reddit.iter_lines([uri]), strip_delta_edits)
            continue
        started = False
        try:
            for start, end in storage.raw_chunks(uri):
                started = True
                yield ("range", index, uri, end - start), clean_range, (uri, start, end, strip_delta_edits)
        except OSError as exc:
            if not started:  # cannot be read at all: an error, as when streamed
                raise
            yield ("range", index, uri, 0), None, (f"{type(exc).__name__}: {exc}",)


def cleaned_lines(
    lines: Iterable[reddit.Line],
    strip_delta_edits: bool,
    workers: int,
    fingerprints: dict[str, storage.RawDigest] | None = None,
) -> Iterator[tuple[reddit.Line, LineResult]]:
    """(line, result) for every line, in input order; batches go to `workers` processes
    (in this process when workers <= 1), at most 2 batches per worker in flight.
    `fingerprints`: file -> its content digest, fed batch by batch (a broken stream: none)."""
    return _results(_line_tasks(lines, strip_delta_edits), workers, fingerprints)


def cleaned_files(
    files: list[str],
    strip_delta_edits: bool,
    workers: int,
    fingerprints: dict[str, storage.RawDigest] | None = None,
) -> Iterator[tuple[reddit.Line, LineResult]]:
    """cleaned_lines of every line of `files`: a plain local file's chunks are read by the workers
    themselves (clean_range), the others (.gz, .bz2, S3) streamed here and sent to them. The same
    lines, results, line numbers and fingerprints either way."""
    return _results(_file_tasks(files, strip_delta_edits), workers, fingerprints)


def _results(
    tasks: Iterable[Task], workers: int, fingerprints: dict[str, storage.RawDigest] | None
) -> Iterator[tuple[reddit.Line, LineResult]]:
    def digest_of(uri: str) -> storage.RawDigest:
        return storage.RawDigest() if fingerprints is None else fingerprints.setdefault(uri, storage.RawDigest())

    numbers: dict[int, int] = {}  # a range-read file (by its place in the inputs) -> its lines so far
    broken: set[int] = set()
    for what, out in _in_order(tasks, workers):
        if what[0] == "lines":
            batch = what[1]
            if isinstance(out, tuple):
                out, digest = out
                digest_of(batch[0].file).add(sum(len(ln.raw) for ln in batch), digest)
            else:
                digest_of(batch[0].file).broken = True
            yield from zip(batch, out)
            continue
        _, index, uri, n_bytes = what
        if index in broken:  # its stream broke before this chunk
            continue
        number = numbers.get(index, 0)
        if isinstance(out, str):
            broken.add(index)
            digest_of(uri).broken = True
            yield (
                reddit.Line(uri, number + 1, b"", error=out),
                LineResult("reject", reason="unreadable_stream", detail=out),
            )
            continue
        results, digest = out
        digest_of(uri).add(n_bytes, digest)
        for res in results:
            number += 1
            yield reddit.Line(uri, number, res.raw), res
        numbers[index] = number


def resolve_workers(config: CleanConfig, files: list[str]) -> int:
    if config.workers > 0:
        return config.workers
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    if usable <= 1 or sum(storage.size(f) for f in files) < AUTO_SERIAL_BYTES:
        return 1
    return min(usable, 4)


# --- stats --------------------------------------------------------------------------------------------


DELTA_KINDS = ("op_confirmed", "op_unconfirmed", "non_op", "non_op_confirmed", "rejected_by_deltabot")


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


# --- output ---------------------------------------------------------------------------------------------


class BackgroundGzip:
    """A write-only gzip stream compressed on a second thread, in order.

    Compressing the conversations costs more CPU than parsing the dump (zlib's
    default level 6 runs at ~20 MB/s here, level 1 at ~130 MB/s, ISA-L's igzip
    at ~500 MB/s). So: igzip (the `isal` package, in the `clean` extra) when it
    is installed, else zlib level 1; on a second thread, since both release the
    GIL while compressing. `mtime=0` and no file name in the header, and chunk
    boundaries that depend only on the content: the same input gives the same
    bytes (for the same compressor). Memory is bounded by `depth` chunks.
    """

    def __init__(self, raw: IO[bytes], chunk_bytes: int = 4 << 20, depth: int = 4):
        try:
            from isal import igzip

            self._gz: IO[bytes] = igzip.IGzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=2)
        except ImportError:
            self._gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=1)
        self._chunk_bytes = chunk_bytes
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=depth)
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
            self._queue.put(self._parts)
            self._parts, self._size = [], 0

    def _drain(self) -> None:
        while (parts := self._queue.get()) is not None:
            if self._error is None:  # after an error, keep draining so the producer never blocks
                try:
                    # joined here, not on the producer's thread; same chunks for the same content
                    self._gz.write(b"".join(parts))
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
    """Write `<output>/<name>` through a BackgroundGzip; it appears only if the block exits
    cleanly (storage.open_write: atomic, hashed while written, recorded for finish_stage)."""
    with storage.open_write(storage.join(output, name), "wb", compress=False) as raw:
        writer = BackgroundGzip(raw)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()


def _reject_record(line: reddit.Line, reason: str, detail: str = "", **extra: Any) -> bytes:
    rec = {"file": line.file, "line": line.number, "reason": reason, "detail": detail, **extra}
    if "raw" not in rec:
        rec["raw"] = line.raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)


def _check_rejects(stats: dict[str, Any], files: list[str], rejects_uri: str, first: list[str] | None = None) -> None:
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


# --- Pushshift record files -------------------------------------------------------------------------


def input_format(files: list[str]) -> str:
    """ "cornell" or "pushshift" (reddit.sniff_file); a mix of the two is refused (InputError)."""
    kinds = {f: reddit.sniff_file(f) for f in files}
    cornell = [f for f, k in kinds.items() if k == "cornell"]
    records = [f for f, k in kinds.items() if k == "pushshift"]
    if cornell and records:
        raise InputError(
            f"the inputs mix a Cornell thread dump ({cornell[0]}) with Pushshift record files "
            f"({records[0]}); clean each kind in its own run"
        )
    return "pushshift" if records else "cornell"


@contextlib.contextmanager
def _record_store() -> Iterator[reddit.RecordStore]:
    """A RecordStore in a temporary directory under $CMV_SCRATCH (else the system's temp dir), removed after."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cmv-clean-", dir=os.environ.get("CMV_SCRATCH") or None) as tmp:
        store = reddit.RecordStore(os.path.join(tmp, "records.sqlite"))
        try:
            yield store
        finally:
            store.close()


PUSHSHIFT_KEYS = ("submissions", "comments", "duplicate_submissions", "duplicate_comments", "orphan_comments")


def _load_records(
    files: list[str],
    store: reddit.RecordStore,
    totals: Counter[str],
    lines_per_file: dict[str, int],
    rejects: IO[bytes],
    first_rejects: list[str],
    fingerprints: dict[str, storage.RawDigest] | None,
) -> None:
    """Every record line into `store`; unusable lines and orphan comments to `rejects`. Each line
    counts in lines.read (the reject fraction is over record lines); each file is fingerprinted here,
    chunk by chunk exactly as storage.raw_file_digest defines it."""
    from tqdm import tqdm

    def reject(line: reddit.Line, reason: str, detail: str) -> None:
        totals["rejected:" + reason] += 1
        if len(first_rejects) < MESSAGE_REJECTS:
            first_rejects.append(f"{line.file}:{line.number}: {reason} ({detail[:120]})")
        rejects.write(_reject_record(line, reason, detail))

    index = {f: i for i, f in enumerate(files)}
    digest, chunk, size, current = None, storage.chunk_hash(), 0, None
    for line in tqdm(reddit.iter_lines(files), unit=" records", mininterval=2.0, desc="clean: records"):
        if line.file != current:
            if digest is not None and size:
                digest.add(size, chunk.digest())
            current, chunk, size = line.file, storage.chunk_hash(), 0
            digest = (
                storage.RawDigest() if fingerprints is None else fingerprints.setdefault(line.file, storage.RawDigest())
            )
        if line.error is not None:
            digest.broken = True
            totals["lines_read"] += 1
            reject(line, "unreadable_stream", line.error)
            continue
        lines_per_file[line.file] = line.number
        chunk.update(line.raw)
        size += len(line.raw)
        if size >= storage.RAW_CHUNK_BYTES:
            digest.add(size, chunk.digest())
            chunk, size = storage.chunk_hash(), 0
        if line.raw.isspace() or not line.raw:
            totals["blank_lines"] += 1
            continue
        totals["lines_read"] += 1
        try:
            problem = store.add(reddit.parse_line(line.raw), line.raw, index[line.file], line.number)
        except reddit.LineRejected as exc:
            problem = exc.reason, exc.detail
        if problem is not None:
            reject(line, *problem)
    if digest is not None and size:
        digest.add(size, chunk.digest())

    counts = store.finish_loading()
    counts["orphan_comments"] = 0
    for file, number, link, comment_id, raw in store.orphans():
        counts["orphan_comments"] += 1
        rejects.write(
            _reject_record(
                reddit.Line(files[file], number, b""),
                "orphan_comment",
                f"no submission {link} in the inputs",
                level="comment",
                thread_id=link[3:],
                comment_id=comment_id,
                raw=raw.decode("utf-8", errors="replace"),
            )
        )
    for key in PUSHSHIFT_KEYS:
        totals["pushshift:" + key] += counts[key]


def _stream(
    files: list[str],
    output: str,
    config: CleanConfig,
    workers: int,
    fingerprints: dict[str, storage.RawDigest] | None = None,
    pushshift: bool = False,
) -> tuple[dict, Exception | None]:
    """Read every line; write conversations and rejects; returns (stats, failure).
    `pushshift`: the files are Pushshift record files, joined into threads first (_load_records).

    Above the reject limit the conversations are discarded (never published)
    and the error returned; rejects and stats are still written, for diagnosis.
    """
    from tqdm import tqdm

    totals: Counter[str] = Counter()
    lines_per_file = {f: 0 for f in files}
    seen: set[str] = set()
    first_rejects: list[str] = []  # named in the error message when the limit is exceeded
    rejects_uri = storage.join(output, REJECTS)
    with storage.open_write(rejects_uri, "wb") as rejects, contextlib.ExitStack() as scratch:
        try:
            with open_gzip_output(output, CONVERSATIONS) as out:
                store = None
                if pushshift:
                    # Group the records into thread lines (their lines are counted and hashed here)
                    store = scratch.enter_context(_record_store())
                    _load_records(files, store, totals, lines_per_file, rejects, first_rejects, fingerprints)
                    lines = tqdm(
                        store.thread_lines(files),
                        total=store.threads,
                        unit=" threads",
                        mininterval=2.0,
                        desc="clean: threads",
                    )
                    cleaned = cleaned_lines(lines, config.strip_delta_edits, workers)
                else:
                    cleaned = tqdm(
                        cleaned_files(files, config.strip_delta_edits, workers, fingerprints),
                        unit=" threads",
                        mininterval=2.0,
                        desc="clean",
                    )
                for line, res in cleaned:
                    if line.error is None and store is None:
                        lines_per_file[line.file] = line.number
                    if res.kind == "blank":
                        totals["blank_lines"] += 1
                        continue
                    if store is None:
                        totals["lines_read"] += 1
                    if res.kind == "thread" and res.thread_id in seen:
                        if res.span is not None:  # read by a worker: its raw text is read back for the rejects
                            line = reddit.Line(
                                line.file,
                                line.number,
                                storage.read_range(line.file, res.span[0], res.span[0] + res.span[1]),
                            )
                        res = LineResult("reject", reason="duplicate_thread", detail=f"{res.thread_id} read before")
                    if res.kind == "reject":
                        totals["rejected:" + res.reason] += 1
                        if len(first_rejects) < MESSAGE_REJECTS:
                            detail = f" ({res.detail[:120]})" if res.detail else ""
                            first_rejects.append(f"{line.file}:{line.number}: {res.reason}{detail}")
                        rejects.write(_reject_record(line, res.reason, res.detail))
                        continue
                    seen.add(res.thread_id)
                    totals.update(res.counts)
                    for reason, comment_id, raw in res.comment_rejects:
                        where = line
                        if store is not None and (found := store.locate(comment_id)) is not None:
                            where = reddit.Line(files[found[0]], found[1], b"")  # the comment's own record
                        rejects.write(
                            _reject_record(
                                where, reason, level="comment", thread_id=res.thread_id, comment_id=comment_id, raw=raw
                            )
                        )
                    out.write(res.row)
                stats = make_stats(totals, lines_per_file, config)
                _check_rejects(stats, files, rejects_uri, first_rejects)
        except TooManyRejectsError as exc:
            return stats, exc
    return stats, None


def run_clean(
    inputs: list[str], output: str, config: CleanConfig, run_id: str | None = None, force: bool = False
) -> dict | None:
    """Run the clean stage; returns stats.json's content, or None when skipped (manifest matched)."""
    run = storage.begin_stage(
        "clean", output, inputs=list(inputs), config=to_dict(config), run_id=run_id, force=force, raw_inputs=True
    )
    if run is None:
        return None
    try:
        return _run(run, inputs, output, config)
    except BaseException:
        storage.abort_stage(run)  # no _SUCCESS; the next attempt may take the output at once
        raise


def _run(run: storage.StageRun, inputs: list[str], output: str, config: CleanConfig) -> dict:
    started = time.monotonic()

    # Load, clean, write: batches of lines, in order
    files = reddit.expand_inputs(inputs)
    pushshift = input_format(files) == "pushshift"
    workers = resolve_workers(config, files)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # see _worker_init; the same holds in this process
    try:
        fingerprints: dict[str, storage.RawDigest] = {}
        stats, failure = _stream(files, output, config, workers, fingerprints, pushshift)
        for uri, digest in fingerprints.items():
            storage.record_raw_digest(run, uri, digest)
    finally:
        if gc_was_enabled:
            gc.enable()
    storage.write_json(storage.join(output, STATS), stats)
    if failure is not None:
        raise failure

    # Finish: _SUCCESS last
    summary = {
        "threads_written": stats["lines"]["threads_written"],
        "lines_rejected": stats["lines"]["rejected"],
        "comments_kept": stats["comments"]["kept"],
        "deltas": stats["deltas"],
        "winning_branches": stats["winning_branches"],
        **({"pushshift": stats["pushshift"]} if "pushshift" in stats else {}),
    }
    storage.finish_stage(run, summary, declared=True)
    seconds = time.monotonic() - started
    print(summary_text(stats, output, seconds), flush=True)
    log.info(
        "clean: %d threads to %s in %.1f s with %d worker(s)", summary["threads_written"], output, seconds, workers
    )
    if "pushshift" in stats:
        log.info("clean: Pushshift records: %s", ", ".join(f"{k} {v:,}" for k, v in stats["pushshift"].items()))
    return stats
