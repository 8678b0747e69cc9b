"""The clean stage: raw CMV dump -> conversations with deltas and winning branches.

`cmv clean --input <dump file, directory or URI> [--input ...] --output <dir or URI>`

Streams the dump one line (one Reddit thread) at a time; memory is bounded by
a few batches of lines whatever the input size. Writes, under the output:
- `conversations.jsonl.gz`: one thread a line (docs/ARCHITECTURE.md "Stage outputs"),
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
Cornell dump by content (records.sniff_file). Their records are deduplicated by id (the
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

Speed: the lines are cleaned in worker processes (`clean.workers`; clean/workers.py, which
reads a plain local dump by byte ranges in the workers themselves) and compressed on a thread
(clean/output.py). The output bytes do not depend on the number of workers nor on the path.
benchmarks/bench_clean.py measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from cmv_core import storage
from cmv_core.clean.config import CONVERSATIONS, MESSAGE_REJECTS, REJECTS, STATS, CleanConfig
from cmv_core.clean.output import open_gzip_output
from cmv_core.clean.readers import input_format, load_records, record_store
from cmv_core.clean.rows import LineResult
from cmv_core.clean.stats import TooManyRejectsError, check_rejects, make_stats, reject_record, summary_text
from cmv_core.clean.workers import cleaned_files, cleaned_lines, resolve_workers
from cmv_core.cmv.dump import Line, expand_inputs
from cmv_core.cmv.records import RecordStore
from cmv_core.config import load_recipe, section, to_dict

log = logging.getLogger(__name__)


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


# --- the stage ------------------------------------------------------------------------------------


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
    files = expand_inputs(inputs)
    pushshift = input_format(files) == "pushshift"
    workers = resolve_workers(config, files)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # see pool._worker_init; the same holds in this process
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


# --- the lines, cleaned and written ---------------------------------------------------------------


def _stream(
    files: list[str],
    output: str,
    config: CleanConfig,
    workers: int,
    fingerprints: dict[str, storage.RawDigest] | None = None,
    pushshift: bool = False,
) -> tuple[dict, Exception | None]:
    """Read every line; write conversations and rejects; returns (stats, failure).
    `pushshift`: the files are Pushshift record files, joined into threads first (load_records).

    Above the reject limit the conversations are discarded (never published)
    and the error returned; rejects and stats are still written, for diagnosis.
    """
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
                    store = scratch.enter_context(record_store())
                    load_records(files, store, totals, lines_per_file, rejects, first_rejects, fingerprints)
                for line, res in _cleaned(files, config, workers, fingerprints, store):
                    if line.error is None and store is None:
                        lines_per_file[line.file] = line.number
                    if res.kind == "blank":
                        totals["blank_lines"] += 1
                        continue
                    if store is None:
                        totals["lines_read"] += 1
                    if res.kind == "thread" and res.thread_id in seen:
                        line, res = _duplicate(line, res)
                    if res.kind == "reject":
                        totals["rejected:" + res.reason] += 1
                        if len(first_rejects) < MESSAGE_REJECTS:
                            detail = f" ({res.detail[:120]})" if res.detail else ""
                            first_rejects.append(f"{line.file}:{line.number}: {res.reason}{detail}")
                        rejects.write(reject_record(line, res.reason, res.detail))
                        continue
                    seen.add(res.thread_id)
                    totals.update(res.counts)
                    for record in _comment_rejects(line, res, files, store):
                        rejects.write(record)
                    out.write(res.row)
                stats = make_stats(totals, lines_per_file, config)
                check_rejects(stats, files, rejects_uri, first_rejects)
        except TooManyRejectsError as exc:
            return stats, exc
    return stats, None


def _cleaned(
    files: list[str],
    config: CleanConfig,
    workers: int,
    fingerprints: dict[str, storage.RawDigest] | None,
    store: RecordStore | None,
) -> Iterable[tuple[Line, LineResult]]:
    """(line, result) of every thread: the store's joined threads (Pushshift), else the files' lines."""
    from tqdm import tqdm

    if store is not None:
        lines = tqdm(
            store.thread_lines(files),
            total=store.threads,
            unit=" threads",
            mininterval=2.0,
            desc="clean: threads",
        )
        return cleaned_lines(lines, config.strip_delta_edits, workers)
    return tqdm(
        cleaned_files(files, config.strip_delta_edits, workers, fingerprints),
        unit=" threads",
        mininterval=2.0,
        desc="clean",
    )


def _duplicate(line: Line, res: LineResult) -> tuple[Line, LineResult]:
    """A thread whose id was read before: rejected, with its line's raw text for the rejects."""
    if res.span is not None:  # read by a worker: its raw text is read back for the rejects
        line = Line(line.file, line.number, storage.read_range(line.file, res.span[0], res.span[0] + res.span[1]))
    return line, LineResult("reject", reason="duplicate_thread", detail=f"{res.thread_id} read before")


def _comment_rejects(line: Line, res: LineResult, files: list[str], store: RecordStore | None) -> Iterator[bytes]:
    """The rejects records of a written thread's unusable comment objects; a Pushshift comment is
    located at its own record."""
    for reason, comment_id, raw in res.comment_rejects:
        where = line
        if store is not None and (found := store.locate(comment_id)) is not None:
            where = Line(files[found[0]], found[1], b"")  # the comment's own record
        yield reject_record(where, reason, level="comment", thread_id=res.thread_id, comment_id=comment_id, raw=raw)
