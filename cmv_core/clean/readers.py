"""The inputs' kind, and Pushshift record files read into a RecordStore before they are cleaned.

A Pushshift export (`.zst` as distributed, or `.gz`/`.bz2`/plain: storage.open_read) is told from
a Cornell dump by content (records.sniff_file). Its record lines are counted, fingerprinted and
rejected here; the threads the store joins are then cleaned exactly as dump lines.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import IO

from cmv_core import storage
from cmv_core.clean.config import MESSAGE_REJECTS
from cmv_core.clean.stats import PUSHSHIFT_KEYS, reject_record
from cmv_core.cmv.dump import Line, iter_lines
from cmv_core.cmv.records import RecordStore, sniff_file
from cmv_core.cmv.threads import LineRejected, parse_line
from cmv_core.errors import InputError


def input_format(files: list[str]) -> str:
    """ "cornell" or "pushshift" (sniff_file); a mix of the two is refused (InputError)."""
    kinds = {f: sniff_file(f) for f in files}
    cornell = [f for f, k in kinds.items() if k == "cornell"]
    records = [f for f, k in kinds.items() if k == "pushshift"]
    if cornell and records:
        raise InputError(
            f"the inputs mix a Cornell thread dump ({cornell[0]}) with Pushshift record files "
            f"({records[0]}); clean each kind in its own run"
        )
    return "pushshift" if records else "cornell"


@contextlib.contextmanager
def record_store() -> Iterator[RecordStore]:
    """A RecordStore in a temporary directory under $CMV_SCRATCH (else the system's temp dir), removed after."""
    with tempfile.TemporaryDirectory(prefix="cmv-clean-", dir=os.environ.get("CMV_SCRATCH") or None) as tmp:
        store = RecordStore(os.path.join(tmp, "records.sqlite"))
        try:
            yield store
        finally:
            store.close()


def load_records(
    files: list[str],
    store: RecordStore,
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

    def reject(line: Line, reason: str, detail: str) -> None:
        totals["rejected:" + reason] += 1
        if len(first_rejects) < MESSAGE_REJECTS:
            first_rejects.append(f"{line.file}:{line.number}: {reason} ({detail[:120]})")
        rejects.write(reject_record(line, reason, detail))

    index = {f: i for i, f in enumerate(files)}
    digest, chunk, size, current = None, storage.chunk_hash(), 0, None
    for line in tqdm(iter_lines(files), unit=" records", mininterval=2.0, desc="clean: records"):
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
            problem = store.add(parse_line(line.raw), line.raw, index[line.file], line.number)
        except LineRejected as exc:
            problem = exc.reason, exc.detail
        if problem is not None:
            reject(line, *problem)
    if digest is not None and size:
        digest.add(size, chunk.digest())
    _finish_loading(files, store, totals, rejects)


def _finish_loading(files: list[str], store: RecordStore, totals: Counter[str], rejects: IO[bytes]) -> None:
    """Index the store; its orphan comments to `rejects`; its counts into `totals` (stats.json's `pushshift`)."""
    counts = store.finish_loading()
    counts["orphan_comments"] = 0
    for file, number, link, comment_id, raw in store.orphans():
        counts["orphan_comments"] += 1
        rejects.write(
            reject_record(
                Line(files[file], number, b""),
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
