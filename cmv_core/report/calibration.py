"""How far to trust the judge: its accuracy on real delta pairs (calibration), every instrument
against a cross-validated length model on the same pairs, and the time split (pairs of threads
created before a date against those after it).

The calibration and instrument numbers use the test threads' delta pairs; train-period pairs (a
time split's pairs_before.jsonl) enter only the time-split comparison (``summarize_time_split``).
"""

from __future__ import annotations

from typing import Any

from cmv_core.report.intervals import ALPHA, MIN_THREADS, rate_with_ci
from cmv_core.report.units import is_headline, pair_units, single_units, thread_of
from cmv_core.stats.comparisons import paired_accuracy_test, two_sample_difference
from cmv_core.stats.logistic import cv_length_model
from cmv_core.stats.resampling import cluster_mean_ci, mean_or_none
from cmv_core.stats.scoring import brier, paired_auc

# Published numbers for the CMV pair task (see docs/DATA.md), shown beside the judge's
# own calibration accuracy so readers know how far to trust the judge.
REFERENCE_ACCURACY = {
    "tan_et_al_2016_interplay_features": 0.65,
    "length_baseline_literature": 0.60,
}


def _accuracy_block(units: list[dict], *, n_boot: int, seed: int, folds: int = 5) -> dict:
    """Accuracy (pair = unit, tie = 1/2) with a thread-cluster interval; Brier of P(winner); the
    simple length baseline (longer wins) and a cross-validated length-only logistic model on the
    same pairs, each with a paired exact test of the judge against it."""
    threads = [u["thread"] for u in units]
    scores = [u["score"] for u in units]
    acc = cluster_mean_ci(scores, threads, bounds=(0.0, 1.0))
    cv = cv_length_model([u["length_diff"] for u in units], threads, folds=folds, seed=seed)
    cv_scores = [1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5 for p in cv]
    probs = [u["p_winner"] for u in units if u["p_winner"] is not None]
    return {
        "n_pairs": len(units),
        "n_threads": acc["n_threads"],
        "accuracy": acc["estimate"],
        "accuracy_ci95": acc["ci95"],
        "brier": brier(probs) if len(probs) == len(units) and units else None,
        "n_with_probabilities": len(probs),
        "length_baseline": mean_or_none([u["length"] for u in units]),
        "vs_length": paired_accuracy_test(scores, [u["length"] for u in units], threads, n_boot=n_boot, seed=seed)
        if units
        else None,
        "length_cv_accuracy": mean_or_none(cv_scores),
        # P(winner) from the length model: its Brier score is comparable to the judge's
        "length_cv_brier": brier(cv) if cv else None,
        "vs_length_cv": paired_accuracy_test(scores, cv_scores, threads, n_boot=n_boot, seed=seed) if units else None,
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
        "accuracy_winner_first": rate_with_ci(
            sum(1 for o in by_first["winner"] if o["correct"]), len(by_first["winner"])
        ),
        "accuracy_winner_second": rate_with_ci(
            sum(1 for o in by_first["loser"] if o["correct"]), len(by_first["loser"])
        ),
        "both_orders_correct": rate_with_ci(sum(1 for r in ok if all(o["correct"] for o in r["orders"])), len(ok)),
        "position_consistency": rate_with_ci(sum(1 for r in ok if r["consistent"]), len(ok)),
        # Longer reply (in words) wins; equal length counts half. On the same (judged) pairs.
        "length_baseline": rate_with_ci(sum(u["length"] for u in units), len(units)),
        "vs_length": block["vs_length"],
        "brier": block["brier"],
        "references": dict(REFERENCE_ACCURACY),
    }


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
    # a published pair set's rows have their own blocks (summarize_pair_files), outside the time split too
    calibration_rows = [r for r in calibration_rows if not r.get("source")]
    validation_rows = [r for r in validation_rows if not r.get("source")]
    sources = _instrument_units(calibration_rows, validation_rows, criteria)
    for name, (all_units, all_rows) in sources.items():
        units = [u for u in all_units if u["headline"]]
        rows = [r for r in all_rows if is_headline(r)]
        if not all_rows:
            continue
        block = _accuracy_block(units, n_boot=n_boot, seed=seed)
        block["n_failed"] = len(rows) - len(units)
        if name == "single":
            block["auc"] = {c: paired_auc([u["diff"][c] for u in units]) for c in criteria}
            block["auc_weighted"] = {c: paired_auc([u["weighted_diff"][c] for u in units]) for c in criteria}
            block["accuracy_criterion"] = criteria[0]
        if split_utc is not None:
            block["time_split"] = summarize_time_split(all_units, split_utc, n_boot=n_boot, seed=seed)
        out[name] = block
    return out


def _instrument_units(calibration_rows: list[dict], validation_rows: list[dict], criteria: list[str]) -> dict:
    """Per instrument, the units of the rows given (as in summarize_instruments)."""
    pairwise = [r for r in validation_rows if r["instrument"] == "pairwise"]
    single = [r for r in validation_rows if r["instrument"] == "single"]
    return {
        "forced_choice": (pair_units(calibration_rows), calibration_rows),
        "pairwise": (pair_units(pairwise), pairwise),
        "single": (single_units(single, criteria), single),
    }


def summarize_pair_files(
    calibration_rows: list[dict],
    validation_rows: list[dict],
    sources: dict[str, dict],
    criteria: list[str],
    *,
    n_boot: int,
    seed: int,
) -> dict:
    """Every instrument on each published pair set (Tan et al. 2016's pair task, ConvoKit's
    winning-args corpus; judge.pair_files), beside the published accuracies: per instrument, the
    accuracy (pair = unit, tie = 1/2) with an interval over original posts, the AUC (of P(winner) for
    a two-reply prompt, of the persuasiveness difference for the rubric, of the word difference for
    length), and the paired exact test against length on the same pairs; per source, the pairs
    judged and those skipped, by reason (``sources``: the judge's summary of its pair files)."""
    out: dict[str, dict] = {}
    for source, info in sources.items():
        cal = [r for r in calibration_rows if r.get("source") == source]
        val = [r for r in validation_rows if r.get("source") == source]
        block: dict[str, Any] = {**info, "references": dict(REFERENCE_ACCURACY), "instruments": {}}
        for name, (units, rows) in _instrument_units(cal, val, criteria).items():
            if not rows:
                continue
            acc = _accuracy_block(units, n_boot=n_boot, seed=seed)
            acc["n_failed"] = len(rows) - len(units)
            if name == "single":
                acc["auc"] = paired_auc([u["weighted_diff"][criteria[0]] for u in units])
            else:
                probs = [u["p_winner"] for u in units if u["p_winner"] is not None]
                acc["auc"] = paired_auc([p - 0.5 for p in probs]) if len(probs) == len(units) else None
            block["instruments"][name] = acc
        # length needs no judge: every pair of the source (longer wins, tie = 1/2)
        pairs = list({r["pair_id"]: r for r in cal + val}.values())
        length = cluster_mean_ci(
            [r["length"]["score"] for r in pairs], [thread_of(r) for r in pairs], bounds=(0.0, 1.0)
        )
        block["instruments"]["length"] = {
            "n_pairs": len(pairs),
            "n_threads": length["n_threads"],
            "accuracy": length["estimate"],
            "accuracy_ci95": length["ci95"],
            "auc": paired_auc([r["length"]["winner_words"] - r["length"]["loser_words"] for r in pairs]),
        }
        out[source] = block
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
        "split_date": dt.datetime.fromtimestamp(split_utc, dt.UTC).isoformat(),
        "n_undated": len(units) - len(dated),
        "min_threads": MIN_THREADS,
    }
    for name, us in groups.items():
        acc = cluster_mean_ci([u["score"] for u in us], [u["thread"] for u in us], bounds=(0.0, 1.0))
        out[name] = {
            "n_pairs": len(us),
            "n_threads": acc["n_threads"],
            "accuracy": acc["estimate"],
            "accuracy_ci95": acc["ci95"],
        }
    diff = two_sample_difference(
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
