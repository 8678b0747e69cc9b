"""Summarise judge verdicts: pure functions from judgment rows to numbers, text and plots.

Input rows are the lines of ``judgments.jsonl`` written by ``cmv_core.judge.stage`` (one row per
single-answer grade, per pairwise comparison with both orders inside, per calibration pair).
Nothing here calls a judge or touches storage; plots are returned as PNG bytes so the caller
decides where they go. The statistics are in ``cmv_core.stats``: the unit of resampling is the
thread (examples of one thread share a prompt), comparisons are paired on the same items, and
``conclusion_lines`` states in words what the numbers support, or that they cannot tell. The
calibration and instrument numbers use the test threads' delta pairs; train-period pairs (a time
split's pairs_before.jsonl) enter only the time-split comparison (``summarize_time_split``).
numpy and matplotlib are imported inside functions (stage images that only import the module for
its constants must not need them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from cmv_core import stats

# Published numbers for the CMV pair task (see shared/CMV_DATA.md), shown beside the judge's
# own calibration accuracy so readers know how far to trust the judge.
REFERENCE_ACCURACY = {
    "tan_et_al_2016_interplay_features": 0.65,
    "length_baseline_literature": 0.60,
}
LIKERT = range(1, 8)
Z95 = 1.959963984540054


# ---------------------------------------------------------------- intervals


def bootstrap_mean_ci(
    values: list[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; seeded, so a rerun gives the same numbers."""
    if not values:
        return None
    import numpy as np

    data = np.asarray(values, dtype=float)
    if len(data) == 1:
        return (float(data[0]), float(data[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=(n_boot, len(data)))
    means = data[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def wilson_ci(successes: float, n: int) -> tuple[float, float] | None:
    """Wilson score interval for a proportion: sane at 0% and 100% and for small n."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rate(count: float, n: int) -> dict[str, Any]:
    return {"rate": (count / n) if n else None, "count": count, "ci95": wilson_ci(count, n)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- sections


def _thread(r: dict) -> str:
    return str(r.get("thread_id") or r.get("item_id") or r.get("pair_id") or r["id"])


def summarize_single(rows: list[dict], criteria: list[str], *, n_boot: int, seed: int) -> dict:
    """Per variant and criterion: the mean of per-thread means with a thread-cluster bootstrap
    interval, of parsed scores (and of the probability-weighted scores where the judge gave
    log-probabilities), plus a histogram of the parsed scores."""
    variants: dict[str, dict] = {}
    for variant in sorted({r["variant"] for r in rows}):
        vrows = [r for r in rows if r["variant"] == variant]
        ok = [r for r in vrows if r["status"] == "ok"]
        per_crit = {}
        for ci, crit in enumerate(criteria):
            scored = [r for r in ok if r["scores"].get(crit) is not None]
            wrows = [r for r in ok if (r.get("weighted_scores") or {}).get(crit) is not None]
            parsed = stats.cluster_bootstrap_ci(
                [r["scores"][crit] for r in scored], [_thread(r) for r in scored], n_boot=n_boot, seed=seed + ci
            )
            weighted = stats.cluster_bootstrap_ci(
                [r["weighted_scores"][crit] for r in wrows], [_thread(r) for r in wrows], n_boot=n_boot, seed=seed + ci
            )
            per_crit[crit] = {
                "n": len(scored),
                "n_threads": parsed["n_threads"],
                "mean": parsed["estimate"],
                "ci95": parsed["ci95"],
                "n_weighted": len(wrows),
                "weighted_mean": weighted["estimate"],
                "weighted_ci95": weighted["ci95"],
                "histogram": {str(k): sum(1 for r in scored if r["scores"][crit] == k) for k in LIKERT},
            }
        variants[variant] = {"n": len(vrows), "n_ok": len(ok), "n_failed": len(vrows) - len(ok), "criteria": per_crit}
    return {"criteria": list(criteria), "variants": variants}


def _score_of(r: dict, crit: str) -> float | None:
    """The probability-weighted score where the judge gave one, else the parsed digit."""
    if r["status"] != "ok":
        return None
    w = (r.get("weighted_scores") or {}).get(crit)
    return w if w is not None else r["scores"].get(crit)


def summarize_single_differences(
    rows: list[dict], criteria: list[str], comparisons: list[tuple[str, str]], *, n_boot: int, seed: int
) -> dict:
    """Per comparison (a, b) and criterion: the paired per-thread difference of a's and b's scores
    on the same prompts (probability-weighted where available), interval and sign-flip p-value.
    Prompts where either side failed are excluded from both and counted."""
    by_variant: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[str(r["item_id"])] = r
    out: dict[str, dict] = {}
    for a, b in comparisons:
        if a not in by_variant or b not in by_variant:
            continue
        ra, rb = by_variant[a], by_variant[b]
        clusters = {i: _thread(r) for i, r in {**rb, **ra}.items()}
        per = {}
        for ci, crit in enumerate(criteria):
            per[crit] = stats.paired_difference(
                {i: _score_of(r, crit) for i, r in ra.items()},
                {i: _score_of(r, crit) for i, r in rb.items()},
                clusters,
                n_boot=n_boot,
                seed=seed + ci,
            )
        out[f"{a}_vs_{b}"] = {"a": a, "b": b, "criteria": per}
    return out


def summarize_pairwise(rows: list[dict], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Win/tie/loss of side ``a`` per comparison. A pair whose two orders disagree counts as a
    tie (MT-Bench's convention) and is also counted as inconsistent, so it is never hidden.
    ``preference`` is P(a beats b) = win + tie/2, thread-weighted, with a thread-cluster interval
    and a sign-flip p-value against 1/2; failed pairs are excluded and counted."""
    out: dict[str, dict] = {}
    for comp in sorted({r["comparison"] for r in rows}):
        crows = [r for r in rows if r["comparison"] == comp]
        ok = [r for r in crows if r["status"] == "ok"]
        n = len(ok)
        counts = {k: sum(1 for r in ok if r["outcome"] == k) for k in ("win", "tie", "loss")}
        consistent = sum(1 for r in ok if r["consistent"])
        orders = [o for r in ok for o in r["orders"] if o["verdict"] in ("A", "B")]
        out[comp] = {
            "a": crows[0]["a"],
            "b": crows[0]["b"],
            "n": n,
            "n_failed": len(crows) - n,
            "win": _rate(counts["win"], n),
            "tie": _rate(counts["tie"], n),
            "loss": _rate(counts["loss"], n),
            "inconsistent": n - consistent,
            "position_consistency": _rate(consistent, n),
            # Share of decisive single-order verdicts that picked the first-shown reply: 0.5 is unbiased.
            "first_position_preference": _rate(sum(1 for o in orders if o["verdict"] == "A"), len(orders)),
            "preference": stats.preference(
                [r["outcome"] for r in crows], [_thread(r) for r in crows], n_boot=n_boot, seed=seed
            ),
        }
    return out


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
                "thread": _thread(r),
                "score": sum(scores) / len(scores),
                "p_winner": sum(probs) / len(probs) if all(p is not None for p in probs) else None,
                "length": r["length"]["score"],
                "length_diff": r["length"]["winner_words"] - r["length"]["loser_words"],
                "created_utc": r.get("created_utc"),
                "headline": is_headline(r),
            }
        )
    return units


def _accuracy_block(units: list[dict], *, n_boot: int, seed: int, folds: int = 5) -> dict:
    """Accuracy (pair = unit, tie = 1/2) with a thread-cluster interval; Brier of P(winner); the
    simple length baseline (longer wins) and a cross-validated length-only logistic model on the
    same pairs, each with a paired exact test of the judge against it."""
    threads = [u["thread"] for u in units]
    scores = [u["score"] for u in units]
    acc = stats.cluster_bootstrap_ci(scores, threads, n_boot=n_boot, seed=seed)
    cv = stats.cv_length_model([u["length_diff"] for u in units], threads, folds=folds, seed=seed)
    cv_scores = [1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5 for p in cv]
    probs = [u["p_winner"] for u in units if u["p_winner"] is not None]
    return {
        "n_pairs": len(units),
        "n_threads": acc["n_threads"],
        "accuracy": acc["estimate"],
        "accuracy_ci95": acc["ci95"],
        "brier": stats.brier(probs) if len(probs) == len(units) and units else None,
        "n_with_probabilities": len(probs),
        "length_baseline": stats._mean([u["length"] for u in units]),
        "vs_length": stats.paired_accuracy_test(scores, [u["length"] for u in units], threads, n_boot=n_boot, seed=seed)
        if units
        else None,
        "length_cv_accuracy": stats._mean(cv_scores),
        # P(winner) from the length model: its Brier score is comparable to the judge's
        "length_cv_brier": stats.brier(cv) if cv else None,
        "vs_length_cv": stats.paired_accuracy_test(scores, cv_scores, threads, n_boot=n_boot, seed=seed)
        if units
        else None,
    }


def summarize_calibration(rows: list[dict], *, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Judge accuracy at telling the delta-winning human reply from its matched loser, with the
    pair as the unit (both orders averaged; interval over threads), per presentation order,
    beside a length baseline on the same pairs with an exact paired test."""
    if not rows:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    judged = [o for r in ok for o in r["orders"]]
    by_first = {first: [o for o in judged if o["first"] == first] for first in ("winner", "loser")}
    units = pair_units(rows)
    block = _accuracy_block(units, n_boot=n_boot, seed=seed)
    correct = sum(1 for o in judged if o["correct"])
    return {
        "n_pairs": len(rows),
        "n_ok": len(ok),
        "n_failed": len(rows) - len(ok),
        # the rate equals the share of correct orders; the interval resamples threads of pairs
        "accuracy": {
            "rate": block["accuracy"],
            "count": correct,
            "n_orders": len(judged),
            "ci95": block["accuracy_ci95"],
        },
        "accuracy_winner_first": _rate(sum(1 for o in by_first["winner"] if o["correct"]), len(by_first["winner"])),
        "accuracy_winner_second": _rate(sum(1 for o in by_first["loser"] if o["correct"]), len(by_first["loser"])),
        "both_orders_correct": _rate(sum(1 for r in ok if all(o["correct"] for o in r["orders"])), len(ok)),
        "position_consistency": _rate(sum(1 for r in ok if r["consistent"]), len(ok)),
        # Longer reply (in words) wins; equal length counts half. On the same (judged) pairs.
        "length_baseline": _rate(sum(u["length"] for u in units), len(units)),
        "vs_length": block["vs_length"],
        "brier": block["brier"],
        "references": dict(REFERENCE_ACCURACY),
    }


def _single_units(rows: list[dict], criteria: list[str]) -> list[dict]:
    """Validation rows of the single-answer rubric: winner and loser graded separately; one unit
    per pair where both grades parsed, with the score differences per criterion."""
    units = []
    for r in rows:
        if r["status"] != "ok":
            continue
        w, l_ = r["orders"]
        diff = {c: w["scores"][c] - l_["scores"][c] for c in criteria}
        wdiff = {c: (_score_of(w, c) - _score_of(l_, c)) for c in criteria}
        units.append(
            {
                "pair_id": r["pair_id"],
                "thread": _thread(r),
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


def summarize_instruments(
    calibration_rows: list[dict],
    validation_rows: list[dict],
    criteria: list[str],
    *,
    n_boot: int,
    seed: int,
    split_utc: float | None = None,
) -> dict:
    """Every judge instrument scored against real deltas on the same kind of pairs: the
    forced-choice calibration prompt, the pairwise prompt behind the headline preference, and the
    single-answer rubric behind the Likert scores. Per instrument: accuracy (tie = 1/2), Brier of
    P(winner) (both orders averaged), AUC of the score difference (rubric), and the gain over a
    cross-validated length-only logistic model on the same pairs. All of that is on the test pairs
    (``is_headline``), as the calibration section. With ``split_utc``, ``time_split`` compares the
    accuracy on pairs of threads created before that date (with the format stage's time split: its
    train-period pairs) with the accuracy on those after it (:func:`summarize_time_split`)."""
    out: dict[str, dict] = {}
    sources = {
        "forced_choice": (pair_units(calibration_rows), calibration_rows),
        "pairwise": (
            pair_units([r for r in validation_rows if r["instrument"] == "pairwise"]),
            [r for r in validation_rows if r["instrument"] == "pairwise"],
        ),
        "single": (
            _single_units([r for r in validation_rows if r["instrument"] == "single"], criteria),
            [r for r in validation_rows if r["instrument"] == "single"],
        ),
    }
    for name, (all_units, all_rows) in sources.items():
        units = [u for u in all_units if u["headline"]]
        rows = [r for r in all_rows if is_headline(r)]
        if not all_rows:
            continue
        block = _accuracy_block(units, n_boot=n_boot, seed=seed)
        block["n_failed"] = len(rows) - len(units)
        if name == "single":
            block["auc"] = {c: stats.paired_auc([u["diff"][c] for u in units]) for c in criteria}
            block["auc_weighted"] = {c: stats.paired_auc([u["weighted_diff"][c] for u in units]) for c in criteria}
            block["accuracy_criterion"] = criteria[0]
        if split_utc is not None:
            block["time_split"] = summarize_time_split(all_units, split_utc, n_boot=n_boot, seed=seed)
        out[name] = block
    return out


def summarize_time_split(units: list[dict], split_utc: float, *, n_boot: int, seed: int) -> dict:
    """An instrument's accuracy (pair = unit, tie = 1/2) on pairs of threads created before
    ``split_utc`` against those on or after it: per group the number of pairs and threads and the
    thread-weighted accuracy with a thread-cluster interval; the difference before - after with a
    bootstrap interval and a two-sample permutation test over threads; and a ``reading``:
    ``too_few`` (a group has under MIN_THREADS threads: cannot tell), ``better_before`` (consistent
    with the judge having read the earlier threads in pretraining), ``better_after``, or
    ``no_difference`` (not shown at ALPHA). Pairs without a creation time are counted, not used."""
    import datetime as dt

    dated = [u for u in units if u.get("created_utc") is not None]
    groups = {
        "before": [u for u in dated if u["created_utc"] < split_utc],
        "after": [u for u in dated if u["created_utc"] >= split_utc],
    }
    out: dict[str, Any] = {
        "split_utc": split_utc,
        "split_date": dt.datetime.fromtimestamp(split_utc, dt.timezone.utc).isoformat(),
        "n_undated": len(units) - len(dated),
        "min_threads": MIN_THREADS,
    }
    for name, us in groups.items():
        acc = stats.cluster_bootstrap_ci([u["score"] for u in us], [u["thread"] for u in us], n_boot=n_boot, seed=seed)
        out[name] = {
            "n_pairs": len(us),
            "n_threads": acc["n_threads"],
            "accuracy": acc["estimate"],
            "accuracy_ci95": acc["ci95"],
        }
    diff = stats.two_sample_difference(
        [u["score"] for u in groups["before"]],
        [u["thread"] for u in groups["before"]],
        [u["score"] for u in groups["after"]],
        [u["thread"] for u in groups["after"]],
        n_boot=n_boot,
        seed=seed,
    )
    out["difference"] = {
        "estimate": diff["estimate"],
        "ci95": diff["ci95"],
        "p_value": diff["p_value"],
        "exact_permutation": diff["exact"],
    }
    if min(out["before"]["n_threads"], out["after"]["n_threads"]) < MIN_THREADS:
        out["reading"] = "too_few"
    elif diff["p_value"] >= ALPHA:
        out["reading"] = "no_difference"
    else:
        out["reading"] = "better_before" if diff["estimate"] > 0 else "better_after"
    return out


# ---------------------------------------------------------------- length control, scale


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
                    "thread": _thread(r),
                    "y": y,
                    "length": math.tanh(d / sd),
                    "shown_first": 1.0 if o["first"] == r["a"] else -1.0,
                    "truncated": trunc,
                    "preamble": pre,
                }
            )
    return out


LC_FEATURES = ("length", "shown_first", "truncated", "preamble")


def summarize_length_control(pairwise_rows: list[dict], probe_rows: list[dict], *, n_boot: int, seed: int) -> dict:
    """The preference at equal length and style per comparison, beside the raw one, and the
    length probe: P(the judge prefers the longer of two versions of the same reply)."""
    lc = stats.length_controlled_preference(length_control_rows(pairwise_rows), features=list(LC_FEATURES))
    probe = (
        stats.preference([r["outcome"] for r in probe_rows], [_thread(r) for r in probe_rows], n_boot=n_boot, seed=seed)
        if probe_rows
        else None
    )
    return {"model": lc, "probe_prefer_longer": probe}


def summarize_scale(pairwise_rows: list[dict], *, base: str, reference: str, n_boot: int, seed: int) -> dict:
    """Bradley-Terry strengths over every pairwise verdict (one comparison per pair, a tie = 1/2),
    anchored at ``base`` = 0, and for each other model the share of the base-to-human-winner gap it
    closes, with thread-cluster bootstrap intervals."""
    ok = [r for r in pairwise_rows if r["status"] == "ok"]
    comps = [(r["a"], r["b"], stats.OUTCOME_SCORE[r["outcome"]]) for r in ok]
    threads = [_thread(r) for r in ok]
    players = sorted({p for a, b, _ in comps for p in (a, b)})
    out: dict[str, Any] = {"base": base, "reference": reference, "players": players, "models": {}}
    if not comps:
        return out
    models = [p for p in players if p not in (base, reference) and not p.startswith(HUMAN_PREFIX)]
    first = None
    for i, m in enumerate(models or [None]):
        fit = stats.bradley_terry_bootstrap(
            comps, threads, model=m or base, base=base, reference=reference, n_boot=min(n_boot, 500), seed=seed + i
        )
        first = first or fit
        if m is not None:
            out["models"][m] = {"gap_closed": fit["gap_closed"], "gap_closed_ci95": fit["gap_closed_ci95"]}
    out["strengths"] = first["strengths"]
    out["strengths_ci95"] = first["strengths_ci95"]
    out["n_comparisons"], out["n_threads"] = first["n_comparisons"], first["n_threads"]
    return out


HUMAN_PREFIX = "human"


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


def build_report(rows: list[dict], *, criteria: list[str], meta: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """The whole report.json object."""
    kinds = {
        k: [r for r in rows if r["kind"] == k]
        for k in ("single", "pairwise", "calibration", "validation", "length_probe")
    }
    comparisons = [tuple(c) for c in meta.get("comparisons") or sorted({(r["a"], r["b"]) for r in kinds["pairwise"]})]
    report = {
        **meta,
        "single": summarize_single(kinds["single"], criteria, n_boot=n_boot, seed=seed),
        "single_differences": summarize_single_differences(
            kinds["single"], criteria, comparisons, n_boot=n_boot, seed=seed
        ),
        "pairwise": summarize_pairwise(kinds["pairwise"], n_boot=n_boot, seed=seed),
        "calibration": summarize_calibration(
            [r for r in kinds["calibration"] if is_headline(r)], n_boot=n_boot, seed=seed
        ),
        "instruments": summarize_instruments(
            kinds["calibration"],
            kinds["validation"],
            criteria,
            n_boot=n_boot,
            seed=seed,
            split_utc=meta.get("time_split_utc"),
        ),
        "length_control": summarize_length_control(kinds["pairwise"], kinds["length_probe"], n_boot=n_boot, seed=seed),
        "scale": summarize_scale(
            kinds["pairwise"],
            base=meta.get("base_variant", "base"),
            reference=meta.get("human_variant", "human"),
            n_boot=n_boot,
            seed=seed,
        ),
        "truncated_generations": summarize_truncation(rows),
        "failures": summarize_failures(rows),
        "usage": summarize_usage(rows),
    }
    report["conclusion"] = conclusion_lines(report, criteria)
    return report


# ---------------------------------------------------------------- conclusion

MIN_THREADS = 10  # fewer threads than this: the report says the data cannot tell
ALPHA = 0.05


def _sig(p: float | None) -> str:
    return "n/a" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}")


def _judge_line(report: dict) -> tuple[str | None, bool | None]:
    """'judge agreement with real deltas 58% [52, 64] vs length 55% (p = 0.03)' and whether the
    judge beats the length baseline on the same pairs (None: no calibration)."""
    cal = report.get("calibration")
    if not cal or not cal["vs_length"] or cal["accuracy"]["rate"] is None:
        return None, None
    vs = cal["vs_length"]
    lo, hi = cal["accuracy"]["ci95"]
    beats = vs["p_value"] < ALPHA and vs["difference"] > 0
    text = (
        f"judge agreement with real deltas {100 * cal['accuracy']['rate']:.0f}% [{100 * lo:.0f}, "
        f"{100 * hi:.0f}] vs length {100 * vs['second']:.0f}% on the same {vs['n']} pairs "
        f"(exact paired test p = {_sig(vs['p_value'])})"
    )
    return text, beats


def time_split_reading(t: dict) -> str:
    """The time-split comparison of one instrument in words."""
    b, a = t["before"], t["after"]
    if t["reading"] == "too_few":
        return (
            f"too few pairs to tell (threads: {b['n_threads']} before, {a['n_threads']} after; at least "
            f"{t['min_threads']} in each needed)"
        )
    if t["reading"] == "no_difference":
        return "no difference shown"
    if t["reading"] == "better_before":
        return "better before the date: consistent with the judge having read those threads in pretraining"
    return "better after the date"


def conclusion_lines(report: dict, criteria: list[str]) -> list[str]:
    """What the numbers support, in words, one line per comparison, then what limits them."""
    lines: list[str] = []
    judge_text, beats = _judge_line(report)
    crit = criteria[0] if criteria else None
    lc = (report.get("length_control") or {}).get("model") or {}
    # in the order the comparisons were asked for (the first is the headline), then any others
    asked = [f"{a}_vs_{b}" for a, b in report.get("comparisons") or []]
    order = [c for c in asked if c in report["pairwise"]] + [c for c in report["pairwise"] if c not in asked]
    for comp in order:
        p = report["pairwise"][comp]
        a, b = p["a"], p["b"]
        pref = p["preference"]
        n_threads = pref["n_threads"]
        parts = []
        diff = (report["single_differences"].get(comp) or {}).get("criteria", {}).get(crit) if crit else None
        if diff and diff["estimate"] is not None:
            parts.append(f"{diff['estimate']:+.2f} {crit} {_ci(diff['ci95'])} (p = {_sig(diff['p_value'])})")
        if pref["estimate"] is not None:
            parts.append(f"P({a} preferred) {pref['estimate']:.2f} {_ci(pref['ci95'])} (p = {_sig(pref['p_value'])})")
        g = (lc.get("by_group") or {}).get(comp)
        if g:
            parts.append(f"at equal length {g['estimate']:.2f} {_ci(g['ci95'])}")
        parts.append(f"{n_threads} thread{'s' if n_threads != 1 else ''}")
        line = f"**{a} vs {b}**: " + ", ".join(parts)
        if n_threads < MIN_THREADS:
            verdict = f"{n_threads} thread(s) are too few to tell {a} from {b} (at least {MIN_THREADS} needed)."
        elif pref["p_value"] is None or pref["p_value"] >= ALPHA:
            verdict = f"the data cannot tell {a} from {b} apart."
        else:
            better = a if pref["estimate"] > 0.5 else b
            worse = b if better == a else a
            verdict = f"the judge prefers {better} over {worse}"
            if g and g["ci95"][0] <= 0.5 <= g["ci95"][1]:
                verdict += ", but not at equal length: the preference is explained by reply length"
            verdict += "."
        if g and g.get("one_sided_length"):
            verdict += (
                f" ({a}'s replies are always on one side in length here, so the equal-length value "
                "rests on the length effect measured in the other comparisons.)"
            )
        lines.append(f"{line}. Conclusion: {verdict}")
    if judge_text:
        tail = (
            ""
            if beats
            else (
                " The judge has not been shown to know more than reply length about which "
                "reply earns a delta: read its verdicts as length-driven until it does."
            )
        )
        lines.append(judge_text[0].upper() + judge_text[1:] + "." + tail)
    elif report["pairwise"]:
        lines.append("The judge was not validated on real delta pairs (no calibration): its verdicts are unvalidated.")
    split = ((report.get("instruments") or {}).get("forced_choice") or {}).get("time_split")
    if split:  # beside the headline (test pairs), not instead of it
        b, a, d = split["before"], split["after"], split["difference"]
        pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        nums = (
            f"{pct(b['accuracy'])} on {b['n_pairs']} pairs before vs {pct(a['accuracy'])} on {a['n_pairs']} "
            f"after"
            + (
                ""
                if d["estimate"] is None
                else f", difference {d['estimate']:+.2f} {_ci(d['ci95'])} (permutation p = {_sig(d['p_value'])})"
            )
        )
        lines.append(
            f"Time split at {split['split_date'][:10]}: judge agreement with real deltas {nums}: "
            f"{time_split_reading(split)}."
        )
    if not lines:
        lines.append("Nothing was compared: the data cannot tell anything yet.")
    return lines


# ---------------------------------------------------------------- markdown


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(ci: Iterable[float] | None, digits: int = 2) -> str:
    return "n/a" if ci is None else "[" + ", ".join(f"{v:.{digits}f}" for v in ci) + "]"


def _vs(v: dict | None) -> str:
    if not v:
        return "n/a"
    return (
        f"difference {v['difference']:+.2f} {_ci(v['difference_ci95'])}, discordant pairs "
        f"{v['discordant_first_better']} judge / {v['discordant_second_better']} length, p = {_sig(v['p_value'])}"
    )


def _pct(r: dict) -> str:
    if r["rate"] is None:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def render_markdown(report: dict, plots: list[str] = ()) -> str:
    """A readable report.md: what was judged, by whom, how well the judge can be trusted."""
    lines = ["# CMV persuasion: judge report", ""]
    lines += [f"- {c}" for c in report.get("conclusion") or []] + [""]
    lines += [
        f"- judge: `{report.get('judge_model')}` via `{report.get('backend')}` backend, "
        f"rubric `{report.get('rubric_version')}`",
        f"- run: `{report.get('run_id')}`; scores are 1-7 Likert; intervals are 95%: means and "
        "preferences resample threads (a thread's examples share a prompt), per-order rates are Wilson; "
        "p-values are sign-flip tests over threads or exact paired (McNemar) tests",
    ]
    if report.get("human_reference"):
        lines.append(f"- human reference: {report['human_reference']}")
    prov = report.get("provenance") or {}
    if prov.get("models"):
        lines.append(
            "- judge provenance (as returned): model "
            + ", ".join(f"`{m}`" for m in prov.get("models") or [])
            + "; system_fingerprint "
            + (", ".join(f"`{f}`" for f in prov.get("system_fingerprints") or []) or "none")
            + f"; seed {prov.get('seed')}"
        )
    lines.append("")
    cal = report.get("calibration")
    lines += ["## How far to trust the judge (calibration on human pairs)", ""]
    if cal:
        lines += [
            "Both replies were written by people in the same thread; one earned the OP's delta. "
            "The judge saw each pair in both orders.",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| judge accuracy (all orders) | {_pct(cal['accuracy'])} |",
            f"| accuracy, winner shown first | {_pct(cal['accuracy_winner_first'])} |",
            f"| accuracy, winner shown second | {_pct(cal['accuracy_winner_second'])} |",
            f"| correct in both orders | {_pct(cal['both_orders_correct'])} |",
            f"| position consistency | {_pct(cal['position_consistency'])} |",
            f"| length baseline on these pairs (longer wins) | {_pct(cal['length_baseline'])} |",
            f"| judge vs length, exact paired test on the same pairs | {_vs(cal['vs_length'])} |",
            f"| Brier score of P(winner), both orders averaged | {_f(cal['brier'], 3)} |",
            f"| Tan et al. 2016 (interplay features, reference) | "
            f"{100 * cal['references']['tan_et_al_2016_interplay_features']:.0f}% |",
            f"| length baseline (literature, reference) | "
            f"{100 * cal['references']['length_baseline_literature']:.0f}% |",
            f"| pairs judged / failed | {cal['n_ok']} / {cal['n_failed']} |",
            "",
        ]
        vs = cal["vs_length"]
        if vs and not (vs["p_value"] < ALPHA and vs["difference"] > 0):
            lines += [
                "**The judge is not shown to beat the length baseline on these pairs (paired test "
                f"p = {_sig(vs['p_value'])}): read its persuasiveness verdicts with caution.**",
                "",
            ]
    else:
        lines += ["Not run.", ""]

    single = report["single"]
    lines += ["## Single-answer grades (mean, 95% CI)", ""]
    if single["variants"]:
        crits = single["criteria"]
        lines += ["| variant | n ok / failed | " + " | ".join(crits) + " |", "| --- | --- |" + " --- |" * len(crits)]
        for variant, v in single["variants"].items():
            cells = [f"{_f(c['mean'])} {_ci(c['ci95'])}" for c in v["criteria"].values()]
            lines.append(f"| {variant} | {v['n_ok']} / {v['n_failed']} | " + " | ".join(cells) + " |")
        weighted = any(c["n_weighted"] for v in single["variants"].values() for c in v["criteria"].values())
        if weighted:
            lines += [
                "",
                "Probability-weighted scores (sum of p(k)·k over the judge's score-token "
                "probabilities; steadier than the parsed digit):",
                "",
                "| variant | " + " | ".join(crits) + " |",
                "| --- |" + " --- |" * len(crits),
            ]
            for variant, v in single["variants"].items():
                cells = [f"{_f(c['weighted_mean'])} {_ci(c['weighted_ci95'])}" for c in v["criteria"].values()]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["Not run.", ""]

    inst = report.get("instruments") or {}
    if inst:
        lines += [
            "## Every instrument on real delta pairs",
            "",
            "Each instrument judged the delta winner and its matched loser (pair = unit, both orders "
            "averaged, tie = 1/2). The length model is a logistic model on tanh(word difference / sd), "
            "cross-validated by thread on the same pairs.",
            "",
            "| instrument | pairs | accuracy | Brier | length CV accuracy | gain over length CV (p) | "
            "AUC of score difference |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, b in inst.items():
            gain = b["vs_length_cv"]
            gain_txt = (
                "n/a"
                if not gain
                else f"{gain['difference']:+.2f} {_ci(gain['difference_ci95'])} (p = {_sig(gain['p_value'])})"
            )
            aucs = b.get("auc_weighted") or {}
            auc_txt = ", ".join(f"{c} {_f(v)}" for c, v in aucs.items()) if aucs else "-"
            lines.append(
                f"| {name} | {b['n_pairs']} ({b['n_failed']} failed) | {_f(b['accuracy'])} "
                f"{_ci(b['accuracy_ci95'])} | {_f(b['brier'], 3)} | {_f(b['length_cv_accuracy'])} | "
                f"{gain_txt} | {auc_txt} |"
            )
        lines.append("")
        splits = {n: b["time_split"] for n, b in inst.items() if "time_split" in b}
        if splits:
            date = next(iter(splits.values()))["split_date"][:10]
            lines += [
                f"### Time split: threads before and after {date}",
                "",
                "The same instruments on delta pairs of threads created before the date (with the format "
                "stage's time split: its train-period threads, which the judge may have read in "
                "pretraining) and on or after it (the test threads). Accuracy per group is thread-weighted "
                "(tie = 1/2) with a thread-cluster interval; the difference has a bootstrap interval and "
                "a two-sample permutation test over threads. The rows above use the test pairs only.",
                "",
                "| instrument | before: pairs (threads) | before: accuracy | after: pairs (threads) | "
                "after: accuracy | before - after (p) | reading |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for n, t in splits.items():
                b, a, d = t["before"], t["after"], t["difference"]
                diff = (
                    "n/a"
                    if d["estimate"] is None
                    else f"{d['estimate']:+.2f} {_ci(d['ci95'])} (p = {_sig(d['p_value'])})"
                )
                lines.append(
                    f"| {n} | {b['n_pairs']} ({b['n_threads']}) | {_f(b['accuracy'])} "
                    f"{_ci(b['accuracy_ci95'])} | {a['n_pairs']} ({a['n_threads']}) | {_f(a['accuracy'])} "
                    f"{_ci(a['accuracy_ci95'])} "
                    f"| {diff} | {time_split_reading(t)} |"
                )
            lines.append("")

    diffs = report.get("single_differences") or {}
    if diffs:
        lines += [
            "## Paired score differences (a - b on the same prompts; per-thread means)",
            "",
            "| comparison | criterion | difference | p | threads | excluded |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for d in diffs.values():
            for crit, v in d["criteria"].items():
                lines.append(
                    f"| {d['a']} - {d['b']} | {crit} | {_f(v['estimate'])} {_ci(v['ci95'])} | "
                    f"{_sig(v['p_value'])} | {v['n_threads']} | {v['n_excluded']} |"
                )
        lines.append("")

    lines += ["## Pairwise (each pair judged in both orders; disagreement counts as a tie)", ""]
    if report["pairwise"]:
        lines += [
            "| comparison | n | win | tie | loss | inconsistent | position consistency | "
            "first-position preference | failed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for comp, p in report["pairwise"].items():
            lines.append(
                f"| {p['a']} vs {p['b']} | {p['n']} | {_pct(p['win'])} | {_pct(p['tie'])} | "
                f"{_pct(p['loss'])} | {p['inconsistent']} | {_pct(p['position_consistency'])} | "
                f"{_pct(p['first_position_preference'])} | {p['n_failed']} |"
            )
        lines += [
            "",
            "| comparison | P(a preferred) = win + tie/2 | p (vs 1/2) | at equal length and style | threads |",
            "| --- | --- | --- | --- | --- |",
        ]
        by_group = ((report.get("length_control") or {}).get("model") or {}).get("by_group") or {}
        for comp, p in report["pairwise"].items():
            pr, g = p["preference"], by_group.get(comp)
            lc_txt = f"{g['estimate']:.2f} {_ci(g['ci95'])}" if g else "n/a"
            lines.append(
                f"| {p['a']} vs {p['b']} | {_f(pr['estimate'])} {_ci(pr['ci95'])} | "
                f"{_sig(pr['p_value'])} | {lc_txt} | {pr['n_threads']} |"
            )
        lines.append("")
    else:
        lines += ["Not run.", ""]

    lc = report.get("length_control") or {}
    if (lc.get("model") or {}).get("coef"):
        m = lc["model"]
        lines += [
            "## Length and style control",
            "",
            "A logistic model of each pairwise verdict (per order) with an intercept per comparison and "
            "shared terms for tanh(word difference / sd), the reply shown first, truncated replies and "
            'meta preambles ("Here\'s a revised version..."); standard errors clustered by thread. '
            "The preference at equal length is the intercept's.",
            "",
            "- coefficients: "
            + ", ".join(f"{k} {v:+.2f} (SE {m['coef_se'][k]:.2f})" for k, v in m["coef"].items())
            + (f"; not estimable here (constant): {', '.join(m['dropped'])}" if m["dropped"] else ""),
        ]
        probe = lc.get("probe_prefer_longer")
        if probe and probe["estimate"] is not None:
            lines.append(
                f"- length probe (the same reply in full vs trimmed): P(prefer longer | same content) "
                f"{probe['estimate']:.2f} {_ci(probe['ci95'])}, {probe['n_threads']} threads"
            )
        lines.append("")

    scale = report.get("scale") or {}
    if scale.get("strengths"):
        lines += [
            "## A scale anchored on people (Bradley-Terry over every pairwise verdict)",
            "",
            f"Strengths on the logit scale, `{scale['base']}` = 0; share of gap closed = "
            f"(model - {scale['base']}) / ({scale['reference']} - {scale['base']}).",
            "",
            "| variant | strength |",
            "| --- | --- |",
        ]
        for v, st in sorted(scale["strengths"].items(), key=lambda kv: kv[1]):
            lines.append(f"| {v} | {st:+.2f} {_ci(scale['strengths_ci95'].get(v))} |")
        for m, g in scale["models"].items():
            lines.append("")
            lines.append(
                f"- {m}: share of the gap to `{scale['reference']}` closed "
                f"{_f(g['gap_closed'])} {_ci(g['gap_closed_ci95'])}"
            )
        lines.append("")

    trunc = report.get("truncated_generations") or {}
    if trunc:
        lines += [
            "- generated replies cut by the token limit (finish_reason length): "
            + ", ".join(f"{v} {n}" for v, n in trunc.items()),
            "",
        ]

    fail = report["failures"]
    lines += [
        "## Failures (excluded from every score, never scored as a number)",
        "",
        f"- judge calls that failed: {fail['failed_calls']} "
        f"(unparseable after retries: {fail['unparseable']}, refusals: {fail.get('refusals', 0)}, "
        f"transport errors: {fail['errors']})",
        f"- judgments excluded: {fail['excluded_judgments']}",
    ]
    for ex in fail["examples"]:
        lines.append(f"  - `{ex['id']}` {ex['status']}: {ex['error']}; raw: `{ex['raw'][:120]!r}`")
    usage = report["usage"]
    timing = ""
    if report.get("judge_seconds") is not None:
        timing = f"- time: judging {report['judge_seconds']:.0f} s (up to the report)" + (
            f", training {report['train_seconds']:.0f} s" if report.get("train_seconds") else ""
        )
    lines += (
        ["", "## Usage", ""]
        + ([timing] if timing else [])
        + [
            f"- judge calls: {usage['attempts']} ({usage['cached_calls']} from cache, "
            f"{usage['new_calls']} new this run)",
            f"- tokens: {usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion",
        ]
    )
    if (
        report.get("backend") in ("openai", "openai-batch")
        and "prices_usd_per_mtok" in report
        and not report.get("prices_usd_per_mtok")
    ):
        # An endpoint model with no price: $0 would read as "free"; say that it was not priced.
        lines += [f"- cost: not computed, no price for `{report.get('judge_model')}` (set judge.prices)", ""]
    else:
        lines += [f"- cost: ${usage['cost_usd']:.4f} in all, ${usage['cost_usd_this_run']:.4f} this run", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render_plots(report: dict) -> dict[str, bytes]:
    """PNG bytes by file name: score histograms per criterion, and pairwise outcome bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    single = report["single"]
    if single["variants"]:
        crits = single["criteria"]
        fig, axes = plt.subplots(1, len(crits), figsize=(4 * len(crits), 3.2), squeeze=False)
        variants = list(single["variants"])
        width = 0.8 / len(variants)
        for ax, crit in zip(axes[0], crits):
            for i, variant in enumerate(variants):
                hist = single["variants"][variant]["criteria"][crit]["histogram"]
                xs = [k + (i - (len(variants) - 1) / 2) * width for k in LIKERT]
                ax.bar(xs, [hist[str(k)] for k in LIKERT], width=width, label=variant)
            ax.set_title(crit)
            ax.set_xticks(list(LIKERT))
            ax.set_xlabel("score")
        axes[0][0].set_ylabel("replies")
        axes[0][-1].legend(fontsize="small")
        fig.tight_layout()
        plots["scores_histogram.png"] = _png(fig)
    if report["pairwise"]:
        comps = list(report["pairwise"].values())
        fig, ax = plt.subplots(figsize=(6, 1 + 0.6 * len(comps)))
        left = [0.0] * len(comps)
        labels = [f"{p['a']} vs {p['b']}" for p in comps]
        for key, colour in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            vals = [p[key]["rate"] or 0.0 for p in comps]
            ax.barh(labels, vals, left=left, color=colour, label=key)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of pairs")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        plots["pairwise.png"] = _png(fig)
    return plots
