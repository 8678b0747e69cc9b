"""What the judging cost and what it left out: failed calls, tokens and cost, truncated replies."""

from __future__ import annotations


def summarize_failures(rows: list[dict], max_examples: int = 5) -> dict:
    """Count verdicts excluded from the scores, by kind and reason, with a few raw examples."""
    failed_calls = []
    for r in rows:
        calls = r["orders"] if "orders" in r else [r]
        failed_calls += [(r, c) for c in calls if c["status"] != "ok"]
    by_kind: dict[str, int] = {}
    for r, _ in failed_calls:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    return {
        "failed_calls": len(failed_calls),
        "unparseable": sum(1 for _, c in failed_calls if c["status"] == "unparseable"),
        "errors": sum(1 for _, c in failed_calls if c["status"] == "error"),
        "refusals": sum(1 for _, c in failed_calls if c["status"] == "refused"),
        "by_kind": by_kind,
        "excluded_judgments": sum(1 for r in rows if r["status"] != "ok"),
        "examples": [
            {"id": r["id"], "status": c["status"], "error": c.get("error"), "raw": (c.get("raw") or "")[:500]}
            for r, c in failed_calls[:max_examples]
        ],
    }


def summarize_usage(rows: list[dict]) -> dict:
    """Tokens and cost over every judge call behind these judgments, and the share this run paid."""
    calls = [c for r in rows for c in (r["orders"] if "orders" in r else [r])]
    total = {
        k: sum(c.get(k) or 0 for c in calls)
        for k in (
            "attempts",
            "cached_calls",
            "new_calls",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "cost_usd_this_run",
        )
    }
    total["cost_usd"] = round(total["cost_usd"], 6)
    total["cost_usd_this_run"] = round(total["cost_usd_this_run"], 6)
    return total


def summarize_truncation(rows: list[dict]) -> dict:
    """Generated replies that hit the token limit (finish_reason "length"), per variant."""
    seen: dict[str, set] = {}
    for r in rows:
        if r["kind"] == "single" and r.get("truncated"):
            seen.setdefault(r["variant"], set()).add(r["item_id"])
    return {v: len(ids) for v, ids in sorted(seen.items())}
