"""Judgment rows (the lines of judgments.jsonl) from the results of the judge calls."""

from __future__ import annotations

import re

from cmv_core.judge.config import JudgeConfig
from cmv_core.judge.parse import expected_score


def word_count(text: str) -> int:
    return len(text.split())


CALL_FIELDS = (
    "status",
    "attempts",
    "cached_calls",
    "new_calls",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "cost_usd_this_run",
    "model",
    "system_fingerprint",
    "seed",
)


def _order_result(r: dict, first: str, second: str) -> dict:
    verdict = (r.get("verdict") or {}).get("winner")
    preferred = {"A": first, "B": second, "tie": "tie"}.get(verdict)
    keep = {k: r.get(k) for k in CALL_FIELDS}
    return {
        "first": first,
        "second": second,
        **keep,
        "verdict": verdict,
        "preferred": preferred,
        "probs": (r.get("probs") or {}).get("winner"),
        "rationale": r.get("rationale"),
        "error": r.get("error"),
        "raw": r.get("raw") if r["status"] != "ok" else None,
    }


_PREAMBLE = re.compile(
    r"^\W*(?:here'?s|here is|sure\b|certainly\b|of course\b|as an ai\b|i'?d be happy|"
    r"below is|i can help|okay,? here)",
    re.I,
)


def meta_preamble(text: str) -> bool:
    """A reply that opens by talking about itself ("Here's a revised version...") instead of
    arguing: a style flag for the length- and style-controlled preference."""
    return bool(_PREAMBLE.match(text or ""))


def reply_flags(item: dict, variant: str) -> dict:
    return {
        "truncated": item.get("finish", {}).get(variant) == "length",
        "preamble": meta_preamble(item["replies"][variant]),
    }


def pairwise_row(comparison: str, item: dict, a: str, b: str, ab: dict, ba: dict, kind: str = "pairwise") -> dict:
    orders = [_order_result(ab, a, b), _order_result(ba, b, a)]
    row = {
        "kind": kind,
        "id": f"{kind}:{comparison}:{item['item_id']}",
        "comparison": comparison,
        "item_id": item["item_id"],
        "thread_id": item["thread_id"],
        "a": a,
        "b": b,
        "orders": orders,
        "status": "ok" if all(o["status"] == "ok" for o in orders) else "failed",
        "outcome": None,
        "consistent": None,
        "words": {"a": word_count(item["replies"][a]), "b": word_count(item["replies"][b])},
        "flags": {"a": reply_flags(item, a), "b": reply_flags(item, b)},
    }
    if row["status"] == "ok":
        prefs = {o["preferred"] for o in orders}
        row["consistent"] = len(prefs) == 1
        pref = prefs.pop() if row["consistent"] else "tie"
        row["outcome"] = "win" if pref == a else "loss" if pref == b else "tie"
    return row


def _length(pair: dict) -> dict:
    ww, lw_ = word_count(pair["winner"]), word_count(pair["loser"])
    return {"winner_words": ww, "loser_words": lw_, "score": 1.0 if ww > lw_ else 0.0 if ww < lw_ else 0.5}


def pair_tags(pair: dict) -> dict:
    """The split and period of a delta pair, kept on its judgment rows: the report's headline
    calibration uses the test pairs, the time-split view all of them."""
    tags = {"split": pair.get("split", "test"), "period": pair.get("period")}
    # a published pair set's (inputs.load_pair_file): its own block in the report, never the headline
    return {**tags, "source": pair["source"]} if pair.get("source") else tags


def calibration_row(pair: dict, wl: dict, lw: dict, kind: str = "calibration", instrument: str | None = None) -> dict:
    orders = [_order_result(wl, "winner", "loser"), _order_result(lw, "loser", "winner")]
    for o in orders:
        o["correct"] = o["preferred"] == "winner" if o["status"] == "ok" else None
    ok = all(o["status"] == "ok" for o in orders)
    row = {
        "kind": kind,
        "id": f"{instrument or kind}:{pair['pair_id']}",
        "pair_id": pair["pair_id"],
        "thread_id": pair["thread_id"],
        "created_utc": pair.get("created_utc"),
        **pair_tags(pair),
        "orders": orders,
        "status": "ok" if ok else "failed",
        "consistent": (orders[0]["preferred"] == orders[1]["preferred"]) if ok else None,
        "length": _length(pair),
    }
    if instrument:
        row["instrument"] = instrument
        row["id"] = f"validation:{instrument}:{pair['pair_id']}"
    return row


def single_row(item: dict, variant: str, r: dict, criteria: list[str]) -> dict:
    ok = r["status"] == "ok"
    weighted = {c: expected_score(r["probs"][c]) for c in criteria} if ok else None
    return {
        "kind": "single",
        "id": f"single:{variant}:{item['item_id']}",
        "item_id": item["item_id"],
        "thread_id": item["thread_id"],
        "variant": variant,
        "truncated": item.get("finish", {}).get(variant) == "length",
        "status": r["status"],
        "scores": r["verdict"] if ok else None,
        "weighted_scores": weighted,
        "score_probs": r["probs"] if ok else None,
        "rationale": r.get("rationale"),
        "error": r.get("error"),
        "raw": r.get("raw") if not ok else None,
        **{k: r.get(k) for k in CALL_FIELDS if k != "status"},
    }


def human_reply_row(item: dict, human: dict, r: dict, criteria: list[str]) -> dict:
    """The grade of one human reply of the item's thread (the percentile vs humans ranks each
    variant's reply among these); ``delta`` marks a reply that won the OP's delta."""
    row = single_row({"item_id": item["item_id"], "thread_id": item["thread_id"]}, "human_reply", r, criteria)
    del row["item_id"], row["variant"], row["truncated"]
    return {
        **row,
        "kind": "human_reply",
        "id": f"human_reply:{item['thread_id']}:{human['reply_id']}",
        "reply_id": human["reply_id"],
        "delta": human["delta"],
        "words": word_count(human["text"]),
    }


def validation_single_row(pair: dict, rw: dict, rl: dict, criteria: list[str]) -> dict:
    """The rubric run on the delta winner and on its matched loser (two calls, as ``orders``)."""
    grades = []
    for label, r in (("winner", rw), ("loser", rl)):
        ok = r["status"] == "ok"
        grades.append(
            {
                "reply": label,
                **{k: r.get(k) for k in CALL_FIELDS},
                "scores": r["verdict"] if ok else None,
                "weighted_scores": {c: expected_score(r["probs"][c]) for c in criteria} if ok else None,
                "error": r.get("error"),
                "raw": r.get("raw") if not ok else None,
            }
        )
    return {
        "kind": "validation",
        "instrument": "single",
        "id": f"validation:single:{pair['pair_id']}",
        "pair_id": pair["pair_id"],
        "thread_id": pair["thread_id"],
        "created_utc": pair.get("created_utc"),
        **pair_tags(pair),
        "orders": grades,
        "status": "ok" if all(g["status"] == "ok" for g in grades) else "failed",
        "length": _length(pair),
    }


def assemble_rows(builders: list, results: list[dict], cfg: JudgeConfig) -> list[dict]:
    rows = []
    for kind, ctx, start, n in builders:
        res = results[start : start + n]
        if kind == "single":
            rows.append(single_row(ctx[0], ctx[1], res[0], cfg.criteria))
        elif kind == "pairwise":
            rows.append(pairwise_row(*ctx, res[0], res[1]))
        elif kind == "human_reply":
            rows.append(human_reply_row(ctx[0], ctx[1], res[0], cfg.criteria))
        elif kind == "length_probe":
            rows.append(pairwise_row(*ctx, res[0], res[1], kind="length_probe"))
        elif kind == "calibration":
            rows.append(calibration_row(ctx[0], res[0], res[1]))
        elif kind == "validation_pairwise":
            rows.append(calibration_row(ctx[0], res[0], res[1], kind="validation", instrument="pairwise"))
        else:
            rows.append(validation_single_row(ctx[0], res[0], res[1], cfg.criteria))
    return rows
