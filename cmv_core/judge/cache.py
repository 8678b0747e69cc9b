"""The persistent cache of judge answers, and the key that decides when an answer can be reused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid

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
    and at close. Reading takes every file under the URI; a torn last line is skipped."""

    def __init__(self, uri: str, flush_every: int = 50):
        self.uri = uri
        self.flush_every = flush_every
        self.entries: dict[str, dict] = {}
        self.batch_loaded: set[str] = set()  # keys the Batch backend put in this run, not yet read
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self._name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._shard = 0
        self._file = None
        torn = 0
        for rel in storage.list_files(uri):
            if not rel.endswith(".jsonl"):
                continue
            for line in storage.read_bytes(storage.join(uri, rel)).splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["completion"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    torn += 1
        if torn:
            log.warning("judge cache %s: skipped %d unreadable line(s) (a run killed mid-write)", uri, torn)
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

    def take_batch_loaded(self, key: str) -> bool:
        with self._lock:
            if key in self.batch_loaded:
                self.batch_loaded.discard(key)
                return True
            return False

    def _flush_shard(self) -> None:
        if self._pending:
            storage.write_jsonl(storage.join(self.uri, f"{self._name}-{self._shard:05d}.jsonl"), self._pending)
            self._shard += 1
            self._pending = []

    def close(self) -> None:
        with self._lock:
            self._flush_shard()
            if self._file is not None:
                self._file.close()
                self._file = None


def key_backend(cfg: JudgeConfig) -> str:
    """The backend name in cache keys: the Batch API answers exactly as the synchronous endpoint
    does, so both share one cache."""
    return "openai" if cfg.backend == "openai-batch" else cfg.backend
