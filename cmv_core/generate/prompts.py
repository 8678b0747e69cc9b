"""Test prompts: the format stage's ``test.jsonl``, each conversation cut before its first assistant turn."""

from __future__ import annotations

import json
from typing import Any

from cmv_core import storage
from cmv_core.generate.config import InputError, Prompt


def prompt_messages(messages: Any) -> list[dict]:
    """The conversation up to, not including, the first assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    prompt = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs string 'role' and 'content'")
        if m["role"] == "assistant":
            break
        prompt.append({"role": m["role"], "content": m["content"]})
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt (messages before the first assistant turn) must end with a user turn")
    return prompt


def test_file(data: str) -> str:
    for name in ("test.jsonl", "test.jsonl.gz"):
        uri = storage.join(data, name)
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(f"{data} has no test.jsonl")


def load_prompts(data: str, max_prompts: int | None = None) -> list[Prompt]:
    """Test prompts in file order; a bad line is an error naming file and line."""
    uri = test_file(data)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    with storage.open_read(uri, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_prompts is not None and len(prompts) >= max_prompts:
                break
            try:
                row = json.loads(line)
                thread_id = str(row["thread_id"])
                pid = str(row.get("id") or thread_id)
                messages = prompt_messages(row.get("messages"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                why = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
                raise InputError(f"{uri}:{lineno}: {why}") from None
            if pid in seen:
                raise InputError(f"{uri}:{lineno}: duplicate id {pid!r} (first on line {seen[pid]})")
            seen[pid] = lineno
            prompts.append(Prompt(pid, thread_id, messages))
    if not prompts:
        raise InputError(f"{uri}: no prompts")
    return prompts
