"""Judgment rows to the units the report counts: the thread of a row, a row's score, one unit per
judged delta pair, and one row per judged order for the length-controlled model.

Input rows are the lines of ``judgments.jsonl`` written by the judge stage (one row per
single-answer grade, per pairwise comparison with both orders inside, per calibration pair).
"""

from __future__ import annotations

import math

LIKERT = range(1, 8)


def thread_of(r: dict) -> str:
    """A row's thread, the unit of resampling (its item, pair or own id where it names no thread)."""
    return str(r.get("thread_id") or r.get("item_id") or r.get("pair_id") or r["id"])


def score_of(r: dict, crit: str) -> float | None:
    """The probability-weighted score where the judge gave one, else the parsed digit."""
    if r["status"] != "ok":
        return None
    w = (r.get("weighted_scores") or {}).get(crit)
    return w if w is not None else r["scores"].get(crit)


def _order_score(o: dict) -> float | None:
    """1 when an order picked the delta winner, 0 the loser, 1/2 a tie; None when it failed."""
    if o["status"] != "ok":
        return None
    return {"winner": 1.0, "loser": 0.0, "tie": 0.5}.get(o["preferred"])


def _order_p_winner(o: dict) -> float | None:
    """P(delta winner) from one order's verdict probabilities (a tie's probability counts half)."""
    probs = o.get("probs")
    if o["status"] != "ok" or not probs:
        return None
    letter = "A" if o["first"] == "winner" else "B"
    return probs.get(letter, 0.0) + 0.5 * probs.get("tie", 0.0)


def is_headline(r: dict) -> bool:
    """A delta pair of a test thread: the pairs behind the headline calibration. Train-period pairs
    (the format stage's pairs_before.jsonl under a time split) serve only the time-split view."""
    return r.get("split") in (None, "test")


def pair_units(rows: list[dict]) -> list[dict]:
    """One unit per calibration pair with both orders judged: the pair's score (mean over the
    two orders), P(winner) averaged over both orders where probabilities exist, the length
    baseline's score, the word-count difference and the thread. Failed pairs are left out."""
    units = []
    for r in rows:
        if r["status"] != "ok":
            continue
        scores = [_order_score(o) for o in r["orders"]]
        probs = [_order_p_winner(o) for o in r["orders"]]
        units.append(
            {
                "pair_id": r["pair_id"],
                "thread": thread_of(r),
                "score": sum(scores) / len(scores),
                "p_winner": sum(probs) / len(probs) if all(p is not None for p in probs) else None,
                "length": r["length"]["score"],
                "length_diff": r["length"]["winner_words"] - r["length"]["loser_words"],
                "created_utc": r.get("created_utc"),
                "headline": is_headline(r),
            }
        )
    return units


def single_units(rows: list[dict], criteria: list[str]) -> list[dict]:
    """Validation rows of the single-answer rubric: winner and loser graded separately; one unit
    per pair where both grades parsed, with the score differences per criterion."""
    units = []
    for r in rows:
        if r["status"] != "ok":
            continue
        w, l_ = r["orders"]
        diff = {c: w["scores"][c] - l_["scores"][c] for c in criteria}
        wdiff = {c: (score_of(w, c) - score_of(l_, c)) for c in criteria}
        units.append(
            {
                "pair_id": r["pair_id"],
                "thread": thread_of(r),
                "diff": diff,
                "weighted_diff": wdiff,
                "length": r["length"]["score"],
                "length_diff": r["length"]["winner_words"] - r["length"]["loser_words"],
                "created_utc": r.get("created_utc"),
                "headline": is_headline(r),
                "p_winner": None,
                # accuracy of the rubric: the reply with the higher (weighted) persuasiveness
                "score": 1.0 if wdiff[criteria[0]] > 0 else 0.0 if wdiff[criteria[0]] < 0 else 0.5,
            }
        )
    return units


def length_control_rows(rows: list[dict]) -> list[dict]:
    """One row per judged order of every pairwise comparison, for the length-controlled model:
    y (side a preferred = 1, tie = 1/2), tanh(word difference / sd) with sd over all pairs,
    shown-first (+1 when a was shown first), and differences of the truncated and meta-preamble
    flags."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("words")]
    diffs = [r["words"]["a"] - r["words"]["b"] for r in ok]
    if not diffs:
        return []
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs)) or 1.0
    out = []
    for r, d in zip(ok, diffs):
        flags = r.get("flags") or {}
        trunc = float(bool((flags.get("a") or {}).get("truncated"))) - float(
            bool((flags.get("b") or {}).get("truncated"))
        )
        pre = float(bool((flags.get("a") or {}).get("preamble"))) - float(bool((flags.get("b") or {}).get("preamble")))
        for o in r["orders"]:
            y = 1.0 if o["preferred"] == r["a"] else 0.0 if o["preferred"] == r["b"] else 0.5
            out.append(
                {
                    "group": r["comparison"],
                    "thread": thread_of(r),
                    "y": y,
                    "length": math.tanh(d / sd),
                    "shown_first": 1.0 if o["first"] == r["a"] else -1.0,
                    "truncated": trunc,
                    "preamble": pre,
                }
            )
    return out
