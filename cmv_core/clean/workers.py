"""Dump lines in, (line, result) out, in input order: the lines cleaned in batches by worker processes.

Parsing and rebuilding threads is pure Python work per comment, so it runs in worker processes
on batches of lines (`clean.workers`; clean/pool.py), results taken back in input order. A plain
local dump is not read by the stage's process at all: each worker reads, hashes and parses its own
line-aligned byte range of the file (storage.raw_chunks), so the dump never goes through a pipe;
compressed and S3 inputs stream through the stage's process to the workers. The dump's fingerprint
(storage.raw_fingerprint) is hashed in the workers too, chunk by chunk. The results, line numbers
and fingerprints do not depend on the number of workers nor on the path.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator

from cmv_core import storage
from cmv_core.clean.config import CleanConfig
from cmv_core.clean.pool import Task, in_order
from cmv_core.clean.rows import LineResult, clean_line
from cmv_core.cmv.dump import Line, iter_lines

AUTO_SERIAL_BYTES = 64 << 20  # with workers: 0, smaller inputs are cleaned in-process


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


def _batches(lines: Iterable[Line]) -> Iterator[list[Line]]:
    """Consecutive lines of one file, a batch ending at the first line end at or past
    storage.RAW_CHUNK_BYTES (a fingerprint chunk); a broken-stream line is a batch of its own."""
    batch: list[Line] = []
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


def _ranged(uri: str) -> bool:
    """Read by byte ranges in the workers (a plain local file), else streamed through this process."""
    return storage.plain_local(uri)


def _line_tasks(lines: Iterable[Line], strip_delta_edits: bool) -> Iterator[Task]:
    for batch in _batches(lines):
        if batch[0].error is not None:
            broken = LineResult("reject", reason="unreadable_stream", detail=batch[0].error)
            yield ("lines", batch), None, ([broken],)
        else:
            yield ("lines", batch), clean_batch, ([ln.raw for ln in batch], strip_delta_edits)


def _file_tasks(files: list[str], strip_delta_edits: bool) -> Iterator[Task]:
    for index, uri in enumerate(files):
        if not _ranged(uri):
            yield from _line_tasks(iter_lines([uri]), strip_delta_edits)
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
    lines: Iterable[Line],
    strip_delta_edits: bool,
    workers: int,
    fingerprints: dict[str, storage.RawDigest] | None = None,
) -> Iterator[tuple[Line, LineResult]]:
    """(line, result) for every line, in input order; batches go to `workers` processes
    (in this process when workers <= 1), at most 2 batches per worker in flight.
    `fingerprints`: file -> its content digest, fed batch by batch (a broken stream: none)."""
    return _results(_line_tasks(lines, strip_delta_edits), workers, fingerprints)


def cleaned_files(
    files: list[str],
    strip_delta_edits: bool,
    workers: int,
    fingerprints: dict[str, storage.RawDigest] | None = None,
) -> Iterator[tuple[Line, LineResult]]:
    """cleaned_lines of every line of `files`: a plain local file's chunks are read by the workers
    themselves (clean_range), the others (.gz, .bz2, S3) streamed here and sent to them. The same
    lines, results, line numbers and fingerprints either way."""
    return _results(_file_tasks(files, strip_delta_edits), workers, fingerprints)


def _results(
    tasks: Iterable[Task], workers: int, fingerprints: dict[str, storage.RawDigest] | None
) -> Iterator[tuple[Line, LineResult]]:
    def digest_of(uri: str) -> storage.RawDigest:
        return storage.RawDigest() if fingerprints is None else fingerprints.setdefault(uri, storage.RawDigest())

    numbers: dict[int, int] = {}  # a range-read file (by its place in the inputs) -> its lines so far
    broken: set[int] = set()
    for what, out in in_order(tasks, workers):
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
                Line(uri, number + 1, b"", error=out),
                LineResult("reject", reason="unreadable_stream", detail=out),
            )
            continue
        results, digest = out
        digest_of(uri).add(n_bytes, digest)
        for res in results:
            number += 1
            yield Line(uri, number, res.raw), res
        numbers[index] = number


def resolve_workers(config: CleanConfig, files: list[str]) -> int:
    """`clean.workers`; for 0, one per usable CPU (at most 4), or 1 for inputs under AUTO_SERIAL_BYTES."""
    if config.workers > 0:
        return config.workers
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    if usable <= 1 or sum(storage.size(f) for f in files) < AUTO_SERIAL_BYTES:
        return 1
    return min(usable, 4)
