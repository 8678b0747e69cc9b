"""The judge's inputs: the generate stage's replies, the human references and the delta pairs of
the format stage."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from typing import Any

from cmv_core import storage
from cmv_core.cmv import pairs as pairs_mod
from cmv_core.judge.config import HUMAN, HUMAN_NONDELTA, InputError, JudgeConfig

log = logging.getLogger(__name__)


def _rows(uri: str, required: tuple[str, ...]) -> list[dict]:
    rows = []
    for lineno, row in enumerate(storage.read_jsonl(uri), 1):
        missing = [k for k in required if k not in row]
        if missing:
            raise InputError(f"{uri}: line {lineno}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def _first_file(stage_uri: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        uri = storage.join(stage_uri, name)
        if storage.exists(uri):
            return uri
    return None


def instruction_prefix(data: str) -> str | None:
    """The format stage's instruction when it was put in the user turn before the post (from its
    manifest), so the judge sees the OP's post rather than our instruction to the model."""
    cfg = (storage.require_success(data).get("config") or {}).get("format") or {}  # the recipe's format section
    if cfg.get("instruction_role", "user") == "user" and cfg.get("instruction"):
        return str(cfg["instruction"]).strip()
    return None


def strip_instruction(prompt: list[dict], instruction: str | None) -> list[dict]:
    out = [dict(m) for m in prompt]
    first_user = next((m for m in out if m.get("role") == "user"), None)
    if instruction and first_user and first_user["content"].startswith(instruction):
        first_user["content"] = first_user["content"][len(instruction) :].lstrip()
    return out


def load_items(
    generations_uri: str, test_uri: str | None, instruction: str | None = None, human_reference: str = "all"
) -> list[dict]:
    """One item per test prompt: its prompt and the reply of every variant, including the human
    delta winner (variant ``human``: the first assistant turn of the test example, the one that
    answers the same prompt). Joined on the example id that the generate stage copies.

    ``human_reference: depth1`` gives the human reply only where the winning branch is a single
    comment replying to the post (metadata.comment_ids of length 1), so that the judge sees all
    that the human answered; deeper winners answered OP turns the prompt does not show."""
    items: dict[str, dict] = {}
    for row in _rows(generations_uri, ("thread_id", "model", "messages", "response")):
        item_id = str(row.get("id") or row["thread_id"])
        item = items.setdefault(
            item_id,
            {
                "item_id": item_id,
                "thread_id": str(row["thread_id"]),
                "prompt": strip_instruction(row["messages"], instruction),
                "replies": {},
                "finish": {},
            },
        )
        item["replies"][row["model"]] = row["response"]
        item["finish"][row["model"]] = row.get("finish_reason")
    if test_uri:
        for lineno, row in enumerate(_rows(test_uri, ("thread_id", "messages")), 1):
            reply = next((m.get("content") for m in row["messages"] if m.get("role") == "assistant"), None)
            if reply is None:
                raise InputError(f"{test_uri}: line {lineno}: no assistant (human reply) turn")
            item = items.get(str(row.get("id") or row["thread_id"]))
            depth = len((row.get("metadata") or {}).get("comment_ids") or [None])
            if item is not None and (human_reference == "all" or depth == 1):
                item["replies"][HUMAN] = reply
                item["finish"][HUMAN] = "stop"
    return sorted(items.values(), key=lambda i: i["item_id"])


def add_nondelta_replies(items: list[dict], pairs: list[dict], human_reference: str = "all") -> int:
    """Give each item the matched losing reply of its calibration pair (same thread, same winning
    comment: the pair id is the example id) as variant ``human_nondelta``; returns how many."""
    by_id = {p["pair_id"]: p for p in pairs}
    n = 0
    for item in items:
        pair = by_id.get(item["item_id"])
        if pair is None or (human_reference == "depth1" and len(pair.get("loser_comment_ids") or [None]) != 1):
            continue
        item["replies"][HUMAN_NONDELTA] = pair["loser"]
        item["finish"][HUMAN_NONDELTA] = "stop"
        n += 1
    return n


def thread_human_replies(
    pairs: list[dict], thread_ids: set[str], k: int, seed: int, human_reference: str = "all"
) -> dict[str, list[dict]]:
    """Up to ``k`` human replies per thread in ``thread_ids``, for the percentile vs humans: each pair's
    delta winner (``delta: True``) and matched loser, distinct by comment ids (by text where a pair has
    none), depth-1 only under ``human_reference: depth1`` (the judge sees all they answered); a seeded
    sample of ``k`` where a thread has more. The format stage writes no other reply of a thread."""
    found: dict[str, dict[str, dict]] = {}
    for p in pairs:
        thread = str(p.get("thread_id"))
        if thread not in thread_ids:
            continue
        for text, ids, delta in (
            (p["winner"], p.get("winner_comment_ids"), True),
            (p["loser"], p.get("loser_comment_ids"), False),
        ):
            if human_reference == "depth1" and len(ids or [None]) != 1:
                continue
            key = "/".join(map(str, ids)) if ids else "text:" + hashlib.sha256(text.encode()).hexdigest()[:16]
            reply = found.setdefault(thread, {}).setdefault(
                key, {"reply_id": key, "text": text, "delta": delta, "prompt": p["prompt"]}
            )
            reply["delta"] = reply["delta"] or delta
    out = {}
    for thread, replies in found.items():
        keys = sorted(replies)
        if len(keys) > k:
            keys = sorted(random.Random(f"{seed}:{thread}").sample(keys, k))
        out[thread] = [replies[key] for key in keys]
    return out


def _pair_prompt(row: dict) -> list[dict]:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def _text(value: Any) -> str:
    """A reply given as text, a message dict, or a list of messages (the last one is the reply)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content") or value.get("body") or ""
    if isinstance(value, list) and value:
        return _text(value[-1])
    return ""


def load_pairs(pairs_uri: str, instruction: str | None = None, split: str = "test") -> list[dict]:
    """Delta pairs with their tags: ``split`` (the thread's format split; ``split`` when the row has
    none, as in format outputs written before the tag) and ``period`` (before/after the time split)."""
    out = []
    for lineno, row in enumerate(_rows(pairs_uri, ("prompt",)), 1):
        winner = row.get("winner", row.get("winning_reply", row.get("positive")))
        loser = row.get("loser", row.get("losing_reply", row.get("negative")))
        if winner is None or loser is None:
            raise InputError(f"{pairs_uri}: line {lineno}: needs a winning and a losing reply")
        out.append(
            {
                "pair_id": str(row.get("pair_id", row.get("id", lineno))),
                "thread_id": row.get("thread_id"),
                "prompt": strip_instruction(_pair_prompt(row), instruction),
                "winner": _text(winner),
                "loser": _text(loser),
                "winner_comment_ids": row.get("winner_comment_ids"),
                "loser_comment_ids": row.get("loser_comment_ids"),
                "created_utc": row.get("created_utc"),
                "split": row.get("split") or split,
                "period": row.get("period"),
            }
        )
    return out


def _sample(rows: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _read_records(uri: str) -> list[dict]:
    """A JSON-lines file as records, bz2 or gzip inflated by content (cmv.pairs.decompress)."""
    text = pairs_mod.decompress(storage.read_bytes(uri)).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_pair_file(uri: str, cap: int | None, seed: int) -> list[dict]:
    """A published pair set (Tan et al.'s jsonlist[.bz2] or a ConvoKit winning-args directory, told apart
    by content) as delta pairs tagged with their source, then one ``{"skip": reason}`` entry per pair left
    out (the plan judges none of those; the report counts them)."""
    utterances = storage.join(uri, "utterances.jsonl")
    records = _read_records(utterances if storage.exists(utterances) else uri)
    try:
        kind = pairs_mod.detect_format(records[0]) if records else pairs_mod.TAN
    except ValueError as e:
        raise InputError(f"{uri}: {e}") from None
    source = uri.rstrip("/").rsplit("/", 1)[-1]
    if kind == pairs_mod.TAN:
        pairs, skipped = pairs_mod.tan_pairs(records, source)
    else:
        conversations = storage.join(uri if storage.exists(utterances) else uri.rsplit("/", 1)[0], "conversations.json")
        if not storage.exists(conversations):
            raise InputError(f"{uri}: a ConvoKit corpus needs conversations.json beside utterances.jsonl")
        pairs, skipped = pairs_mod.convokit_pairs(records, storage.read_json(conversations), source)
    kept = _sample(pairs, cap, seed)
    skipped = {**skipped, "over_max_pair_file_pairs": len(pairs) - len(kept)} if len(kept) < len(pairs) else skipped
    log.info("%s: %s, %d pair(s) to judge, skipped %s", uri, kind, len(kept), skipped or "none")
    marks = [
        {"source": source, "uri": uri, "format": kind, "skip": r} for r, n in sorted(skipped.items()) for _ in range(n)
    ]
    return [{**p, "uri": uri, "format": kind} for p in kept] + marks


def pair_files_summary(pairs: list[dict]) -> dict[str, dict]:
    """Per published pair source: its uri and format, the pairs judged and those skipped, by reason."""
    out: dict[str, dict] = {}
    for p in pairs:
        if p.get("split") != pairs_mod.SPLIT and "skip" not in p:
            continue
        s = out.setdefault(p["source"], {"uri": p["uri"], "format": p["format"], "n_judged": 0, "skipped": {}})
        if "skip" in p:
            s["skipped"][p["skip"]] = s["skipped"].get(p["skip"], 0) + 1
        else:
            s["n_judged"] += 1
    return out


def load_inputs(generations: str, data: str, config: JudgeConfig) -> tuple[list[dict], list[dict]]:
    """The test prompts with every variant's reply (human references included) and the sampled
    calibration pairs."""
    instruction = instruction_prefix(data)
    generations_uri = _first_file(generations, ("generations.jsonl", "generations.jsonl.gz"))
    if generations_uri is None:
        raise InputError(f"{generations} has no generations.jsonl")
    test_uri = _first_file(data, ("test.jsonl", "test.jsonl.gz"))
    items = _sample(
        load_items(generations_uri, test_uri, instruction, config.human_reference), config.max_items, config.seed
    )
    pairs_uri = _first_file(data, ("pairs.jsonl", "pairs.jsonl.gz"))
    all_pairs = load_pairs(pairs_uri, instruction) if pairs_uri else []
    if config.nondelta_reference:
        add_nondelta_replies(items, all_pairs, config.human_reference)
    if config.single and config.human_replies > 0:
        humans = thread_human_replies(
            all_pairs, {i["thread_id"] for i in items}, config.human_replies, config.seed, config.human_reference
        )
        for item in items:
            item["thread_humans"] = humans.get(item["thread_id"], [])
    pairs: list[dict] = []
    before: list[dict] = []
    if config.calibration:
        if pairs_uri:
            pairs = _sample(all_pairs, config.max_calibration_pairs, config.seed)
        else:
            log.warning("%s has no pairs.jsonl: no calibration", data)
        # The format stage writes it under split: time (file name of cmv_core.format.stage.BEFORE_PAIRS).
        before_uri = _first_file(data, ("pairs_before.jsonl", "pairs_before.jsonl.gz"))
        if before_uri:
            before = _sample(
                load_pairs(before_uri, instruction, split="train"), before_pairs_cap(config, len(pairs)), config.seed
            )
    external = [p for uri in config.pair_files for p in load_pair_file(uri, config.max_pair_file_pairs, config.seed)]
    log.info(
        "loaded %d prompt(s) with variants %s, %d calibration pair(s)%s",
        len(items),
        sorted({v for i in items for v in i["replies"]}),
        len(pairs),
        f" and {len(before)} train-period pair(s) for the time split" if before else "",
    )
    return items, pairs + before + external


def before_pairs_cap(config: JudgeConfig, n_test_pairs: int) -> int:
    """How many train-period pairs to judge: judge.max_before_pairs, else the cap of the test pairs
    (judge.max_calibration_pairs applies per group), else as many as the test pairs judged (equal
    groups give the most power for the calls, and an uncapped run does not judge the whole
    training period)."""
    if config.max_before_pairs is not None:
        return max(0, config.max_before_pairs)
    if config.max_calibration_pairs is not None:
        return config.max_calibration_pairs
    return n_test_pairs


def time_split_utc(data: str, config: JudgeConfig) -> float | None:
    """The date of the time-split view: judge.validation_split_date, else the format stage's
    test_after when it split by time."""
    from cmv_core.config import parse_utc

    when = config.validation_split_date
    if when is None:
        fmt = storage.require_success(data).get("config") or {}
        fmt = fmt.get("format", fmt)
        if fmt.get("split") == "time":
            when = fmt.get("test_after")
    return parse_utc(str(when)) if when else None
