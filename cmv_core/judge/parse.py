"""Reading a judge answer: the verdict fields, and the probabilities of their values."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from cmv_core.judge.config import VerdictError


def parse_verdict(text: str, form: dict[str, list]) -> dict[str, Any]:
    """The verdict fields of a judge answer, or VerdictError saying what is wrong.

    Tolerates code fences and text around the object (json_object/none modes); values must be
    one of the allowed ones: a number outside 1-7 or a missing field is not guessed at."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise VerdictError("no JSON object in the answer")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise VerdictError(f"invalid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise VerdictError("the answer is not a JSON object")
    out: dict[str, Any] = {}
    for name, allowed in form.items():
        if name not in obj:
            raise VerdictError(f"missing field {name!r}")
        value = obj[name]
        if isinstance(allowed[0], int):
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value.strip())
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or value not in allowed:
                raise VerdictError(f"field {name!r} is {value!r}, not an integer {allowed[0]}-{allowed[-1]}")
        else:
            match = [a for a in allowed if isinstance(value, str) and value.strip().lower() == a.lower()]
            if not match:
                raise VerdictError(f"field {name!r} is {value!r}, not one of {allowed}")
            value = match[0]
        out[name] = value
    rationale = obj.get("rationale")
    out["rationale"] = rationale if isinstance(rationale, str) else None
    return out


def choice_probabilities(tokens: list[dict] | None, name: str, allowed: list, chosen: Any) -> dict[str, float] | None:
    """Renormalised probabilities of the allowed values at the token that holds field ``name``'s
    value, from the judge's top log-probabilities; None when they are not available there.

    The field is found in the concatenated token texts (not the message text, which can differ
    for partial multi-byte tokens); its last occurrence is used, since the rationale comes first
    and may quote field names."""
    if not tokens:
        return None
    joined, starts = "", []
    for t in tokens:
        starts.append(len(joined))
        joined += t["token"]
    matches = list(re.finditer(rf'"{re.escape(name)}"\s*:\s*"?', joined))
    if not matches:
        return None
    pos = matches[-1].end()
    idx = max(i for i, s in enumerate(starts) if s <= pos)
    if starts[idx] + len(tokens[idx]["token"]) <= pos:  # value starts in the next token
        idx += 1
    if idx >= len(tokens):
        return None
    canon = {str(a).lower(): a for a in allowed}

    def value_of(token_text: str):
        return canon.get(token_text.strip().strip('"').lower())

    if value_of(tokens[idx]["token"]) != chosen:
        return None  # the value is split across tokens or merged with others: no clean distribution
    probs: dict[str, float] = {}
    for alt, logprob in tokens[idx].get("top") or []:
        value = value_of(alt)
        if value is not None:
            probs[str(value)] = probs.get(str(value), 0.0) + math.exp(logprob)
    total = sum(probs.values())
    if total <= 0:
        return None
    return {k: v / total for k, v in sorted(probs.items())}


def expected_score(probs: dict[str, float] | None) -> float | None:
    """sum_k p(k) * k over the Likert digits: steadier than the single parsed digit."""
    if not probs:
        return None
    return sum(int(k) * p for k, p in probs.items())
