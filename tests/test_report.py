"""Report numbers from hand-made judgment rows: intervals, rates, calibration, failures, text, plots."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from cmv_core.report.build import build_report
from cmv_core.report.calibration import summarize_calibration
from cmv_core.report.intervals import bootstrap_mean_ci, wilson_ci
from cmv_core.report.markdown import render_markdown
from cmv_core.report.plots import render_plots
from cmv_core.report.variants import summarize_pairwise, summarize_single


def single(variant, item, scores, status="ok", weighted=None):
    return {
        "kind": "single",
        "id": f"single:{variant}:{item}",
        "variant": variant,
        "item_id": item,
        "status": status,
        "scores": scores if status == "ok" else None,
        "weighted_scores": weighted if status == "ok" else None,
        "raw": None if status == "ok" else "garbage",
        "error": None if status == "ok" else "invalid JSON",
        "attempts": 1,
        "cached_calls": 0,
        "new_calls": 1,
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "cost_usd": 0.001,
        "cost_usd_this_run": 0.001,
    }


def order(first, second, verdict, status="ok", correct=None):
    pref = {"A": first, "B": second, "tie": "tie"}.get(verdict)
    out = {
        "first": first,
        "second": second,
        "status": status,
        "verdict": verdict,
        "preferred": pref,
        "attempts": 1,
        "cached_calls": 1,
        "new_calls": 0,
        "prompt_tokens": 50,
        "completion_tokens": 5,
        "cost_usd": 0.0005,
        "cost_usd_this_run": 0.0,
        "error": None,
        "raw": None,
    }
    if correct is not None or first in ("winner", "loser"):
        out["correct"] = (pref == "winner") if status == "ok" else None
    return out


def pair(item, a_first_verdict, b_first_verdict, status="ok"):
    orders = [order("ft", "base", a_first_verdict), order("base", "ft", b_first_verdict)]
    prefs = {o["preferred"] for o in orders}
    consistent = len(prefs) == 1 if status == "ok" else None
    pref = (prefs.pop() if consistent else "tie") if status == "ok" else None
    outcome = {"ft": "win", "base": "loss", "tie": "tie"}.get(pref)
    if status != "ok":
        orders[1]["status"] = "unparseable"
    return {
        "kind": "pairwise",
        "id": f"pairwise:ft_vs_base:{item}",
        "comparison": "ft_vs_base",
        "a": "ft",
        "b": "base",
        "item_id": item,
        "orders": orders,
        "status": status,
        "outcome": outcome,
        "consistent": consistent,
    }


def cal(pid, v_winner_first, v_loser_first, winner_words, loser_words):
    orders = [order("winner", "loser", v_winner_first), order("loser", "winner", v_loser_first)]
    return {
        "kind": "calibration",
        "id": f"calibration:{pid}",
        "pair_id": pid,
        "orders": orders,
        "status": "ok",
        "consistent": orders[0]["preferred"] == orders[1]["preferred"],
        "length": {
            "winner_words": winner_words,
            "loser_words": loser_words,
            "score": 1.0 if winner_words > loser_words else 0.0 if winner_words < loser_words else 0.5,
        },
    }


def test_bootstrap_ci_is_the_known_percentile_interval_and_is_seeded():
    values = [1, 2, 2, 3, 5, 6, 7, 7, 4, 4]
    ci = bootstrap_mean_ci(values, n_boot=1000, seed=3)
    assert ci == bootstrap_mean_ci(values, n_boot=1000, seed=3)
    assert ci != bootstrap_mean_ci(values, n_boot=1000, seed=4)
    # Known answer: resampling 40 values, 20 of them 1, gives a mean of Binomial(40, 1/2) / 40. Its
    # 2.5% quantile is 14/40 (P(X <= 13) = 0.019 < 0.025 < P(X <= 14) = 0.040) and its 97.5% quantile
    # 26/40, each over 5 standard errors of 20,000 resamples from the next value (a 90% interval
    # would be (15/40, 25/40)).
    assert bootstrap_mean_ci([0, 1] * 20, n_boot=20000, seed=0) == (0.35, 0.65)
    assert bootstrap_mean_ci([], n_boot=10) is None
    assert bootstrap_mean_ci([5.0], n_boot=10) == (5.0, 5.0)


def test_cluster_bootstrap_ci_is_the_known_interval_of_thread_means():
    from cmv_core.stats.resampling import cluster_bootstrap_ci

    # 40 threads of 3 identical items each, half of them 1: the interval of 40 independent 0/1 values
    # (above), not the narrower one of 120
    values = [v for v in [0.0, 1.0] * 20 for _ in range(3)]
    threads = [t for t in range(40) for _ in range(3)]
    out = cluster_bootstrap_ci(values, threads, n_boot=20000, seed=0)
    assert out["estimate"] == 0.5 and out["ci95"] == (0.35, 0.65)


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval, textbook form: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (5, 10), (1, 10), (3, 7), (37, 100), (1, 1000)])
def test_wilson_interval_matches_the_95_percent_closed_form(k, n):
    z = NormalDist().inv_cdf(0.975)
    lo, hi = wilson_ci(k, n)
    assert (lo, hi) == pytest.approx(_wilson(k, n, z), abs=1e-6)


def test_wilson_interval_bounds():
    lo, hi = wilson_ci(0, 10)
    # not the useless [0, 0] of the normal approximation; z^2 / (n + z^2) at the 95% z (the 90% z
    # would give 0.2130)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    lo, hi = wilson_ci(5, 10)
    assert (lo, hi) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_ci(0, 0) is None


def test_single_means_exclude_failures_and_histogram_counts():
    rows = [
        single("ft", i, {"persuasiveness": s, "fluency": 7}, weighted={"persuasiveness": s + 0.25, "fluency": None})
        for i, s in enumerate([6, 6, 5, 7])
    ]
    rows.append(single("ft", 9, None, status="unparseable"))
    rows.append(single("base", 0, {"persuasiveness": 2, "fluency": 3}))
    out = summarize_single(rows, ["persuasiveness", "fluency"], n_boot=500, seed=0)
    ft = out["variants"]["ft"]
    assert ft["n"] == 5 and ft["n_ok"] == 4 and ft["n_failed"] == 1
    p = ft["criteria"]["persuasiveness"]
    assert p["mean"] == 6.0  # the failure is not scored as 0 or anything else
    assert p["ci95"][0] <= p["mean"] <= p["ci95"][1]
    assert p["weighted_mean"] == 6.25 and p["n_weighted"] == 4
    assert p["histogram"] == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 1, "6": 2, "7": 1}
    assert ft["criteria"]["fluency"]["n_weighted"] == 0 and ft["criteria"]["fluency"]["weighted_mean"] is None
    assert out["variants"]["base"]["criteria"]["persuasiveness"]["mean"] == 2.0


def test_pairwise_rates_sum_to_one_and_inconsistency_is_a_visible_tie():
    rows = [
        pair(1, "A", "B"),  # ft preferred in both orders: win
        pair(2, "A", "B"),  # win
        pair(3, "B", "A"),  # base preferred in both: loss
        pair(4, "A", "A"),  # first position both times: inconsistent -> tie
        pair(5, "tie", "tie"),  # consistent tie
        pair(6, "A", "B", status="failed"),
    ]
    out = summarize_pairwise(rows)["ft_vs_base"]
    assert out["n"] == 5 and out["n_failed"] == 1
    assert out["win"]["count"] == 2 and out["loss"]["count"] == 1 and out["tie"]["count"] == 2
    assert out["win"]["rate"] + out["tie"]["rate"] + out["loss"]["rate"] == pytest.approx(1.0)
    assert out["inconsistent"] == 1
    assert out["position_consistency"]["rate"] == pytest.approx(4 / 5)
    # decisive single-order verdicts: A,B,A,B,B,A,A,A -> 5 of 8 picked the first-shown reply
    assert out["first_position_preference"]["rate"] == pytest.approx(5 / 8)
    for key in ("win", "tie", "loss"):
        lo, hi = out[key]["ci95"]
        assert lo <= out[key]["rate"] <= hi


def test_calibration_accuracy_by_order_and_length_baseline():
    rows = [
        cal("p1", "A", "B", 100, 50),  # right in both orders; winner longer
        cal("p2", "A", "A", 20, 80),  # position-biased: right once
        cal("p3", "B", "A", 40, 40),  # wrong in both; equal length counts half
    ]
    out = summarize_calibration(rows)
    assert out["n_pairs"] == 3 and out["n_ok"] == 3
    assert out["accuracy"]["rate"] == pytest.approx(3 / 6)
    assert out["accuracy_winner_first"]["rate"] == pytest.approx(2 / 3)
    assert out["accuracy_winner_second"]["rate"] == pytest.approx(1 / 3)
    assert out["both_orders_correct"]["rate"] == pytest.approx(1 / 3)
    assert out["position_consistency"]["rate"] == pytest.approx(2 / 3)
    assert out["length_baseline"]["rate"] == pytest.approx(1.5 / 3)
    assert out["references"]["tan_et_al_2016_interplay_features"] == 0.65
    assert summarize_calibration([]) is None


def test_build_report_failures_usage_markdown_and_plots():
    rows = [
        single("ft", 0, {"persuasiveness": 6}),
        single("ft", 1, None, status="unparseable"),
        pair(1, "A", "B"),
        pair(2, "A", "B", status="failed"),
        cal("p1", "A", "B", 10, 5),
    ]
    rep = build_report(
        rows,
        criteria=["persuasiveness"],
        n_boot=200,
        meta={"run_id": "r1", "judge_model": "m", "backend": "openai", "rubric_version": "v"},
    )
    assert rep["failures"]["failed_calls"] == 2
    assert rep["failures"]["unparseable"] == 2 and rep["failures"]["excluded_judgments"] == 2
    assert rep["failures"]["examples"][0]["raw"] == "garbage"
    usage = rep["usage"]
    assert usage["attempts"] == 2 + 4 + 2 and usage["new_calls"] == 2 and usage["cached_calls"] == 6
    assert usage["prompt_tokens"] == 2 * 100 + 6 * 50
    assert usage["cost_usd"] == pytest.approx(2 * 0.001 + 6 * 0.0005)
    assert usage["cost_usd_this_run"] == pytest.approx(0.002)
    md = render_markdown(rep, ["scores_histogram.png"])
    assert "ft vs base" in md and "Tan et al." in md and "6.00" in md and "![scores_histogram.png]" in md
    plots = render_plots(rep)
    assert set(plots) == {"scores_histogram.png", "pairwise.png"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in plots.values())


def test_unpriced_endpoint_model_is_not_reported_as_free():
    rows = [single("ft", 0, {"persuasiveness": 6})]
    meta = {
        "run_id": "r1",
        "judge_model": "my-vllm-judge",
        "backend": "openai",
        "rubric_version": "v",
        "prices_usd_per_mtok": None,
    }
    md = render_markdown(build_report(rows, criteria=["persuasiveness"], n_boot=50, meta=meta))
    assert "cost: not computed, no price for `my-vllm-judge`" in md and "$0.0000" not in md
    meta["prices_usd_per_mtok"] = {"input": 0.15, "output": 0.60}
    md = render_markdown(build_report(rows, criteria=["persuasiveness"], n_boot=50, meta=meta))
    assert "cost: $0.0010 in all, $0.0010 this run" in md


def _calibrated(n, judge_right):
    """n delta pairs where the winner is always longer; the judge is right on the first
    ``judge_right`` of them (both orders) and wrong on the rest."""
    rows = []
    for i in range(n):
        v = ("A", "B") if i < judge_right else ("B", "A")
        rows.append(cal(f"p{i}", v[0], v[1], 100, 50))
    return rows


def test_conclusion_lines_lead_the_report_and_say_what_the_data_support():
    wins = [pair(i, "A", "B") for i in range(24)] + [pair(100 + i, "tie", "tie") for i in range(6)]
    scores = [single("ft", i, {"persuasiveness": 6}) for i in range(30)] + [
        single("base", i, {"persuasiveness": 4}) for i in range(30)
    ]
    meta = {
        "run_id": "r",
        "judge_model": "m",
        "backend": "openai",
        "rubric_version": "v",
        "comparisons": [["ft", "base"]],
    }
    rep = build_report(wins + scores + _calibrated(30, 30), criteria=["persuasiveness"], meta=meta, n_boot=300)
    first = rep["conclusion"][0]
    assert first.startswith("**ft vs base**: ") and "P(ft preferred) 0.90" in first
    assert "the judge prefers ft over base." in first and "30 threads" in first
    # the judge is always right and the length baseline too: no discordant pair, so not shown better
    assert "has not been shown to know more than reply length" in rep["conclusion"][-1]
    md = render_markdown(rep)
    assert md.splitlines()[2] == "- " + first

    # few threads: the report says plainly that the data cannot tell
    few = build_report([pair(i, "A", "B") for i in range(4)], criteria=["persuasiveness"], meta=meta, n_boot=100)
    assert "4 thread(s) are too few to tell ft from base" in few["conclusion"][0]
    # enough threads, no difference: cannot tell
    even = [pair(i, "A", "B") for i in range(10)] + [pair(50 + i, "B", "A") for i in range(10)]
    flat = build_report(even, criteria=["persuasiveness"], meta=meta, n_boot=100)
    assert "the data cannot tell ft from base apart" in flat["conclusion"][0]


def test_train_period_pairs_enter_only_the_time_split_view():
    """Pairs tagged with a train-period split (a time split's pairs_before.jsonl) leave the calibration and
    instrument numbers as they are on the test pairs alone, and fill the time split's "before" group."""
    test_rows = [
        {
            **cal(f"t{i}", *(("A", "B") if i % 2 else ("B", "A")), 10 + i, 12),
            "thread_id": f"t{i}",
            "created_utc": 2000.0 + i,
            "split": "test",
            "period": "after",
        }
        for i in range(12)
    ]
    old_rows = [
        {
            **cal(f"o{i}", "A", "B", 5, 9),
            "thread_id": f"o{i}",
            "created_utc": 1000.0 + i,
            "split": "train" if i % 3 else "val",
            "period": "before",
        }
        for i in range(11)
    ]
    alone = build_report(test_rows, criteria=["persuasiveness"], meta={}, n_boot=200)
    both = build_report(test_rows + old_rows, criteria=["persuasiveness"], meta={"time_split_utc": 1500.0}, n_boot=200)
    assert both["calibration"] == alone["calibration"] and both["calibration"]["n_pairs"] == 12
    fc = {k: v for k, v in both["instruments"]["forced_choice"].items() if k != "time_split"}
    assert fc == alone["instruments"]["forced_choice"] and "time_split" not in alone["instruments"]["forced_choice"]
    assert both["conclusion"][:-1] == alone["conclusion"]  # one line more: the time split
    t = both["instruments"]["forced_choice"]["time_split"]
    assert (t["before"]["n_pairs"], t["before"]["accuracy"]) == (11, 1.0)
    assert (t["after"]["n_pairs"], t["after"]["accuracy"]) == (12, 0.5)
    assert t["reading"] == "better_before" and t["split_date"].startswith("1970-01-01")
