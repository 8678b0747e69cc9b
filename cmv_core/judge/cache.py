"""The persistent cache of judge answers, and the key that decides when an answer can be reused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cmv_core import storage
from cmv_core.judge.config import RUBRIC_VERSION, JudgeConfig

log = logging.getLogger(__name__)


def cache_key(backend: str, model: str, messages: list[dict], form: dict, params: dict) -> str:
    """sha256 over everything that decides the answer: judge, full prompt (replies included),
    form, sampling parameters and the rubric version."""
    blob = json.dumps(
        {
            "rubric": RUBRIC_VERSION,
            "backend": backend,
            "model": model,
            "messages": messages,
            "form": form,
            "params": params,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Judge answers by cache key, persisted under a URI as JSONL files.

    Local: each process appends to its own file and flushes every entry, so a killed run loses
    nothing. S3 (no appends): entries are uploaded as a new shard every ``flush_every`` entries
    and at close; a shard the store refused beyond the retry budget is kept in a node-local spill
    file, read and uploaded by the next run on the node (README, "Inputs and outputs": a stage
    that resumes keeps its finished work), so no answer that was paid for is asked again. Reading
    takes every file under the URI; a torn last line is skipped."""

    def __init__(self, uri: str, flush_every: int = 50):
        self.uri = uri
        self.flush_every = flush_every
        self.entries: dict[str, dict] = {}
        self.batch_loaded: set[str] = set()  # keys the Batch backend put in this run, not yet read
        self.in_flight: dict[str, Any] = {}  # key -> the asyncio future of the one ask for it now in flight
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self._name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._shard = 0
        self._file = None
        torn = 0
        for rel in storage.list_files(uri):
            if not rel.endswith(".jsonl") or rel.startswith("batch/"):  # batch/: judge.batch_runner=files' files
                continue
            for line in storage.read_bytes(storage.join(uri, rel)).splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["completion"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    torn += 1
        if torn:
            log.warning("judge cache %s: skipped %d unreadable line(s) (a run killed mid-write)", uri, torn)
        self._spilled = self._read_spill() if storage.is_s3(uri) else []
        log.info("judge cache %s: %d cached answer(s)", uri, len(self.entries))

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, completion: dict) -> None:
        line = json.dumps({"key": key, "completion": completion}, ensure_ascii=False)
        with self._lock:
            self.entries[key] = completion
            if storage.is_s3(self.uri):
                self._pending.append({"key": key, "completion": completion})
                if len(self._pending) >= self.flush_every:
                    self._flush_shard()
                return
            if self._file is None:
                path = storage.local_path(storage.join(self.uri, f"{self._name}.jsonl"))
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()

    def put_loaded(self, key: str, completion: dict, persist: bool = True) -> None:
        """An answer the Batch backend loaded: new for the first call of this run that reads it. Not
        persisted (``persist=False``) when the batch's output file stays the record of it (batch_runner=files:
        every run reads that file again, so its answers are this run's as in one uninterrupted run)."""
        if persist:
            self.put(key, completion)
        else:
            with self._lock:
                self.entries[key] = completion
        self.batch_loaded.add(key)

    def take_batch_loaded(self, key: str) -> bool:
        with self._lock:
            if key in self.batch_loaded:
                self.batch_loaded.discard(key)
                return True
            return False

    def _read_spill(self) -> list[Path]:
        """Load the answers an earlier run on this node could not upload; they go up with the first
        shard of this run (not at once: a dry run reads the cache and writes nothing)."""
        files = sorted(spill_dir(self.uri).glob("*.jsonl"))
        for f in files:
            for line in f.read_bytes().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["completion"]
                    self._pending.append({"key": entry["key"], "completion": entry["completion"]})
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        if files:
            log.info(
                "judge cache %s: %d answer(s) kept on this node by a run the store failed", self.uri, len(self._pending)
            )
        return files

    def _flush_shard(self) -> None:
        if not self._pending:
            return
        try:
            storage.write_jsonl(storage.join(self.uri, f"{self._name}-{self._shard:05d}.jsonl"), self._pending)
        except BaseException:  # the store away beyond the retry budget, or SIGTERM mid-upload
            self._spill()  # keep the answers for the rerun
            raise
        self._shard += 1
        self._pending = []
        self._drop_spilled()  # every spilled answer was pending, so it is in the store now

    def _spill(self) -> None:
        """Every pending answer (earlier spills included) into this run's spill file; they stay pending, so
        a later flush that succeeds (at close, say) uploads them and drops the file."""
        directory = spill_dir(self.uri)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self._name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self._pending), encoding="utf-8")
        os.replace(tmp, path)
        log.warning(
            "judge cache %s: the store failed; %d answer(s) kept in %s for the rerun",
            self.uri,
            len(self._pending),
            path,
        )
        self._drop_spilled(keep=path)

    def _drop_spilled(self, keep: Path | None = None) -> None:
        for f in self._spilled:
            if f != keep:
                f.unlink(missing_ok=True)
        self._spilled = [keep] if keep else []

    def close(self) -> None:
        with self._lock:
            self._flush_shard()
            if self._file is not None:
                self._file.close()
                self._file = None


def spill_dir(uri: str) -> Path:
    """Node-local, per cache URI (the same directory for every run of it on this node)."""
    base = Path(os.environ.get("CMV_SCRATCH") or tempfile.gettempdir())
    return base / f"cmv-judge-cache-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def key_backend(cfg: JudgeConfig) -> str:
    """The backend name in cache keys: the Batch API answers exactly as the synchronous endpoint
    does, so both share one cache."""
    return "openai" if cfg.backend == "openai-batch" else cfg.backend
