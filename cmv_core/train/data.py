"""Training data (pure): the format stage's JSONL lines, validated line by line.

SFT reads conversations (``messages``); DPO reads preference pairs (``prompt``, ``chosen``, ``rejected``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cmv_core import storage
from cmv_core.errors import InputError
from cmv_core.train.config import ROLES


class TrainDataError(InputError):
    """The format stage's output is not usable for training (names file, line and reason)."""


def validate_example(row: Any, where: str) -> list[dict]:
    """The ``messages`` of one format-stage line, or a TrainDataError naming where and why."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise TrainDataError(f"{where}: expected an object with a non-empty 'messages' list")
    messages = []
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TrainDataError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: str}}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainDataError(f"{where}: no assistant turn, nothing to learn")
    if messages[-1]["role"] != "assistant":
        raise TrainDataError(f"{where}: the last turn must be the assistant's, got {messages[-1]['role']!r}")
    return messages


def load_split(uri: str, limit: int | None = None) -> list[list[dict]]:
    """Conversations of one split file (validated line by line)."""
    return load_validated(uri, validate_example, limit)


def load_validated(uri: str, validate: Callable[[Any, str], Any], limit: int | None = None) -> list:
    """``validate(row, "file:line")`` of each line of a JSONL file; a bad line is a TrainDataError naming it."""
    out: list = []
    try:
        for lineno, row in enumerate(storage.read_jsonl(uri), 1):
            out.append(validate(row, f"{uri}:{lineno}"))
            if limit is not None and len(out) >= limit:
                break
    except ValueError as exc:
        if isinstance(exc, TrainDataError):
            raise
        raise TrainDataError(str(exc)) from None
    return out


def to_prompt_completion(conversation: list[dict]) -> dict:
    """Fallback for templates without generation markers: train on the last assistant turn only."""
    return {"prompt": conversation[:-1], "completion": conversation[-1:]}


def validate_preference(row: Any, where: str) -> dict:
    """``{prompt, chosen, rejected}`` of one format-stage preference line, or a TrainDataError naming where."""
    if not isinstance(row, dict):
        raise TrainDataError(f"{where}: expected an object with prompt, chosen and rejected")
    out = {}
    for key in ("prompt", "chosen", "rejected"):
        messages = row.get(key)
        if not isinstance(messages, list) or not messages:
            raise TrainDataError(f"{where}: {key!r} must be a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise TrainDataError(f"{where}: {key}[{i}] must be {{role: system|user|assistant, content: str}}")
        out[key] = [{"role": m["role"], "content": m["content"]} for m in messages]
    for key in ("chosen", "rejected"):
        if len(out[key]) != 1 or out[key][0]["role"] != "assistant":
            raise TrainDataError(f"{where}: {key!r} must be exactly one assistant message")
    if out["prompt"][-1]["role"] != "user":
        raise TrainDataError(f"{where}: the prompt must end with a user turn")
    return out


def load_preferences(uri: str, limit: int | None = None) -> list[dict]:
    return load_validated(uri, validate_preference, limit)
