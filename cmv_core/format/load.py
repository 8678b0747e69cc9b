"""Reading the clean stage's threads and collecting, thread by thread, the SFT example candidates and the
pairs (test calibration pairs; train/val pairs for DPO preferences and, under a time split, calibration)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from cmv_core import storage
from cmv_core.format.config import DROP_REASONS, FormatConfig, FormatInputError
from cmv_core.format.examples import build_example, build_pairs, tag_pairs
from cmv_core.format.split import assign_split

REQUIRED_THREAD_KEYS = ("thread_id", "title", "op_author", "op_text", "created_utc", "comments", "winning_branches")


def read_threads(uri: str) -> Iterator[tuple[int, dict]]:
    """(line number, thread) from conversations.jsonl.gz, with errors naming file, line and reason."""
    with storage.open_read(uri, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                thread = orjson.loads(line)  # ~3x json's speed; the same objects for any JSON clean writes
            except orjson.JSONDecodeError:
                thread = _json_loads(uri, lineno, line)
            missing = [k for k in REQUIRED_THREAD_KEYS if k not in thread] if isinstance(thread, dict) else ["*"]
            if missing:
                raise FormatInputError(f"{uri}:{lineno}: not a clean-stage thread (missing {', '.join(missing)})")
            yield lineno, thread


def _json_loads(uri: str, lineno: int, line: bytes):
    """What orjson refused: the json module's reading (it takes integers beyond 64 bits), or its error."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatInputError(f"{uri}:{lineno}: not valid JSON ({exc.msg})") from None


def check_branches(uri: str, lineno: int, thread: dict, by_id: dict) -> None:
    for branch in thread["winning_branches"]:
        ids = branch.get("comment_ids") or []
        unknown = [cid for cid in ids if cid not in by_id]
        if not ids or unknown:
            raise FormatInputError(
                f"{uri}:{lineno}: thread {thread['thread_id']}: winning branch {ids} names unknown comments {unknown}"
            )
        if by_id[ids[-1]]["author"] != branch.get("recipient"):
            raise FormatInputError(
                f"{uri}:{lineno}: thread {thread['thread_id']}: winning branch ends at {ids[-1]} by "
                f"{by_id[ids[-1]]['author']!r}, not by its recipient {branch.get('recipient')!r}"
            )


@dataclass
class Loaded:
    """What the Load step keeps of the input: the examples and pairs, and the counts stats.json reports."""

    dropped: Counter = field(default_factory=lambda: Counter({r: 0 for r in DROP_REASONS}))
    candidates: list[dict] = field(default_factory=list)  # SFT examples, before dedupe and the length filter
    pairs: list[dict] = field(default_factory=list)  # test threads (pairs.jsonl)
    before_pairs: list[dict] = field(default_factory=list)  # split: time only (pairs_before.jsonl)
    preference_pairs: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "val": []})
    threads_without_loser: Counter = field(default_factory=lambda: Counter({"train": 0, "val": 0}))
    thread_splits: Counter = field(default_factory=Counter)
    threads: int = 0
    threads_with_winner: int = 0
    branches_total: int = 0


def load_threads(source: str, cfg: FormatConfig) -> Loaded:
    """Stream the threads of ``source``; keep only the examples and the pairs."""
    from tqdm import tqdm

    loaded = Loaded()
    seen_threads: set[str] = set()
    for lineno, thread in tqdm(read_threads(source), desc="format: threads", unit="thread"):
        loaded.threads += 1
        tid = str(thread["thread_id"])
        if tid in seen_threads:
            loaded.dropped["duplicate_thread"] += len(thread["winning_branches"])
            continue
        seen_threads.add(tid)
        split = assign_split(tid, float(thread["created_utc"] or 0), cfg)
        loaded.thread_splits[split] += 1
        by_id = {c["id"]: c for c in thread["comments"]}
        check_branches(source, lineno, thread, by_id)
        branches = _unique_branches(thread, loaded)
        loaded.threads_with_winner += bool(branches)
        _add_examples(thread, branches, by_id, split, cfg, loaded)
        if branches:
            _add_pairs(thread, branches, by_id, split, cfg, loaded)
    return loaded


def _unique_branches(thread: dict, loaded: Loaded) -> list[dict]:
    """The thread's winning branches, one per rewarded comment (repeats counted as duplicate_branch)."""
    branches, seen_rewarded = [], set()
    for branch in thread["winning_branches"]:
        loaded.branches_total += 1
        if branch["comment_ids"][-1] in seen_rewarded:
            loaded.dropped["duplicate_branch"] += 1
            continue
        seen_rewarded.add(branch["comment_ids"][-1])
        branches.append(branch)
    return branches


def _add_examples(
    thread: dict, branches: list[dict], by_id: dict, split: str, cfg: FormatConfig, loaded: Loaded
) -> None:
    for branch in branches:
        example, reason = build_example(thread, branch, by_id, cfg)
        if reason:
            loaded.dropped[reason] += 1
            continue
        example["metadata"]["split"] = split
        loaded.candidates.append(example)


def _add_pairs(thread: dict, branches: list[dict], by_id: dict, split: str, cfg: FormatConfig, loaded: Loaded) -> None:
    if split == "test":
        loaded.pairs.extend(tag_pairs(build_pairs(thread, branches, by_id, cfg), split, cfg))
    elif cfg.preference_pairs or cfg.split == "time":
        # train/val: one matching serves both the DPO preference pairs and, under a time split, the
        # judge's train-period calibration pairs. Validating the judge on delta pairs the fine-tuned
        # model trained on is legitimate: the judge is another model, and none of these is a prompt.
        built = tag_pairs(build_pairs(thread, branches, by_id, cfg), split, cfg)
        if cfg.preference_pairs:
            loaded.preference_pairs[split].extend(built)
            loaded.threads_without_loser[split] += not built
        if cfg.split == "time":
            loaded.before_pairs.extend(built)
