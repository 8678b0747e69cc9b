"""The judge's inputs: the generate stage's replies, the human references and the delta pairs of
the format stage."""

from __future__ import annotations

import logging
import random
from typing import Any

from cmv_core import storage
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
    log.info(
        "loaded %d prompt(s) with variants %s, %d calibration pair(s)%s",
        len(items),
        sorted({v for i in items for v in i["replies"]}),
        len(pairs),
        f" and {len(before)} train-period pair(s) for the time split" if before else "",
    )
    return items, pairs + before


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
