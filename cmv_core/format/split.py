"""Which split a thread goes to: by a seeded hash of its id, or by its creation time (``split: time``)."""

from __future__ import annotations

import hashlib

from cmv_core.config import parse_utc
from cmv_core.format.config import FormatConfig


def hash_unit(seed: int, thread_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, thread_id): adding threads never moves others."""
    digest = hashlib.sha256(f"{seed}:{thread_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(thread_id: str, created_utc: float, cfg: FormatConfig) -> str:
    u = hash_unit(cfg.seed, thread_id)
    if cfg.split == "time":
        if created_utc >= parse_utc(cfg.test_after):
            return "test"
        return "val" if u < cfg.val_fraction else "train"
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"
