"""Coverage of the report's thread-clustered interval by simulation with a known answer (issue 22,
README "Reading the report"): a paired difference with a known effect, thread-level heterogeneity
(each thread its own effect, reply noise on top, 1-6 replies per thread), at 10, 20 and 40 threads.
The t interval on thread means (``cmv_core.stats.small_sample``) must cover; the percentile cluster
bootstrap it replaced does not at 10 threads; the paired test must reject a zero effect at most 6%."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmv_core.report.conclusion import conclusion_lines
from cmv_core.stats.comparisons import paired_difference, preference
from cmv_core.stats.resampling import cluster_bootstrap_ci, cluster_mean_ci, sign_flip_pvalue
from cmv_core.stats.small_sample import t_quantile

REPS = 2000  # replications per case: a rate of 95% (5%) is estimated to +-0.5 points (1 SE)
EFFECT = 0.3


def _paired_sample(rng: np.random.Generator, n_threads: int, effect: float) -> tuple[np.ndarray, np.ndarray]:
    """Per reply, the difference a - b of two sides scored on the same reply, and its thread: a thread
    level shared by both sides (it cancels in the pairing), a thread effect on the difference (sd 1),
    reply noise on each side (sd 0.7), 1-6 replies per thread."""
    sizes = rng.integers(1, 7, n_threads)
    threads = np.repeat(np.arange(n_threads), sizes)
    level = rng.normal(0, 1.5, n_threads)[threads]
    thread_effect = rng.normal(0, 1.0, n_threads)[threads]
    a = level + effect + thread_effect + rng.normal(0, 0.7, len(threads))
    b = level + rng.normal(0, 0.7, len(threads))
    return a - b, threads


def _simulate(n_threads: int, effect: float, seed: int, bootstrap: bool = False, sign_flip: bool = False) -> dict:
    """Over REPS replications: coverage of ``effect`` by the report's interval (``cluster_mean_ci``, as
    ``paired_difference`` calls it) and its t test's rejection rate at 5%; with ``bootstrap`` the coverage
    of the old percentile bootstrap on the same data, with ``sign_flip`` the sign-flip test's rejection
    rate (each the most expensive part of a replication, and each seeded by the replication alone, so
    leaving one out changes no other number)."""
    rng = np.random.default_rng(seed)
    hits = {"t_covers": 0, "t_rejects": 0}
    hits.update({"bootstrap_covers": 0} if bootstrap else {})
    hits.update({"sign_flip_rejects": 0} if sign_flip else {})
    for rep in range(REPS):
        diffs, threads = _paired_sample(rng, n_threads, effect)
        values, clusters = diffs.tolist(), threads.tolist()
        out = cluster_mean_ci(values, clusters)
        lo, hi = out["ci95"]
        hits["t_covers"] += lo <= effect <= hi
        hits["t_rejects"] += out["p_value"] < 0.05
        if sign_flip:
            hits["sign_flip_rejects"] += sign_flip_pvalue(values, clusters, n_perm=2000, seed=rep) < 0.05
        if bootstrap:
            blo, bhi = cluster_bootstrap_ci(values, clusters, n_boot=1000, seed=rep)["ci95"]
            hits["bootstrap_covers"] += blo <= effect <= bhi
    return {k: v / REPS for k, v in hits.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "n_threads, t_floor, bootstrap_ceiling",
    # the t interval: >= 93% at 10 threads, >= 94% at 20 and 40 (nominal 95%); the percentile
    # bootstrap it replaced: under 93% at 10 threads (about 90%: it uses 1.86 standard errors where
    # t on 9 degrees of freedom needs 2.26), so this test fails if the report goes back to it
    [(10, 0.93, 0.93), (20, 0.94, None), (40, 0.94, None)],
)
def test_t_interval_covers_with_few_threads_and_the_percentile_bootstrap_does_not(
    n_threads, t_floor, bootstrap_ceiling
):
    res = _simulate(n_threads, EFFECT, seed=100 + n_threads, bootstrap=True)
    assert res["t_covers"] >= t_floor, res
    assert res["t_covers"] <= 0.975, res  # not bought with a much wider interval than nominal
    assert res["t_covers"] > res["bootstrap_covers"], res
    if bootstrap_ceiling is not None:
        assert res["bootstrap_covers"] < bootstrap_ceiling, res


@pytest.mark.slow
@pytest.mark.parametrize("n_threads", [10, 20, 40])
def test_paired_test_rejects_a_zero_effect_at_most_6_percent(n_threads):
    res = _simulate(n_threads, 0.0, seed=200 + n_threads, sign_flip=True)
    assert res["t_rejects"] <= 0.06, res
    assert res["sign_flip_rejects"] <= 0.06, res
    # the t test is the dual of the interval: it rejects exactly when the interval misses 0
    assert res["t_rejects"] == pytest.approx(1 - res["t_covers"], abs=1e-12), res


def test_t_interval_is_the_textbook_interval_of_thread_means():
    # 10 threads, thread means 0..9 (each thread's replies average to it): mean 4.5, s^2 = 55/6,
    # interval 4.5 +- t(0.975, 9) s / sqrt(10) with t(0.975, 9) = 2.262157 (any t table)
    values = [float(t) + d for t in range(10) for d in (-0.5, 0.5)] + [3.0]
    clusters = [t for t in range(10) for _ in range(2)] + [3]
    out = cluster_mean_ci(values, clusters, null=4.5)
    assert t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)
    assert t_quantile(0.975, 39) == pytest.approx(2.022691, abs=1e-6)
    half = 2.262157163 * math.sqrt(55 / 6 / 10)
    assert out["estimate"] == pytest.approx(4.5) and out["n_threads"] == 10 and out["n_items"] == 21
    assert out["ci95"] == pytest.approx((4.5 - half, 4.5 + half), abs=1e-8)
    assert out["p_value"] == pytest.approx(1.0) and out["df"] == 9
    # the paired difference of the report is this interval on the per-reply differences a - b
    paired = paired_difference(
        {str(i): v + 1.0 for i, v in enumerate(values)},
        {str(i): 1.0 for i in range(21)},
        {str(i): c for i, c in enumerate(clusters)},
    )
    assert paired["ci95"] == pytest.approx(out["ci95"], abs=1e-12)
    # one thread: no spread to measure, no interval
    assert cluster_mean_ci([1.0, 2.0], ["x", "x"])["ci95"] is None


def _conclusion(outcomes: list[str]) -> str:
    report = {
        "comparisons": [["ft", "base"]],
        "pairwise": {"ft_vs_base": {"a": "ft", "b": "base", "preference": preference(outcomes, range(len(outcomes)))}},
        "single_differences": {},
    }
    return conclusion_lines(report, ["persuasiveness"])[0]


def test_conclusion_says_when_the_threads_are_too_few_to_tell_the_effect_seen_from_none():
    # 7 wins and 5 losses in 12 threads: P = 7/12, s^2 = 420/1584, half-width t(0.975, 11) * s / sqrt(12)
    # = 0.327 > the 0.083 seen; the same spread needs 12 * (0.327 / 0.083)^2 = 185 threads
    line = _conclusion(["win"] * 7 + ["loss"] * 5)
    half = 2.200985160 * math.sqrt(420 / 1584 / 12)
    assert half == pytest.approx(0.3272, abs=1e-4) and math.ceil(12 * (half / (1 / 12)) ** 2) == 185
    assert line.endswith(
        "Conclusion: the data cannot tell ft from base apart: 12 threads are too few to tell a preference of "
        "0.58 from 1/2 (the interval reaches 0.33 either side, more than the 0.08 seen; about 185 threads "
        "would be needed)."
    ), line
    # no preference seen at all: says so, with the interval's reach (s^2 = 3/11: 2.201 * 0.151 = 0.33)
    assert _conclusion(["win", "loss"] * 6).endswith(
        "the data cannot tell ft from base apart (no preference seen; the interval reaches 0.33 either side of 1/2)."
    )
    # 45 wins in 60 threads: the interval excludes 1/2 and the line says which is preferred, nothing more
    line = _conclusion(["win"] * 45 + ["loss"] * 15)
    assert line.endswith("Conclusion: the judge prefers ft over base.") and "too few" not in line


def test_an_interval_is_cut_to_its_scale_and_keeps_its_width_inside():
    # Three threads at 100, 100 and 0 (percentiles): the t interval on 2 df reaches past both ends.
    from cmv_core.stats.resampling import cluster_mean_ci

    values, threads = [100.0, 100.0, 0.0], ["a", "b", "c"]
    free = cluster_mean_ci(values, threads)
    cut = cluster_mean_ci(values, threads, bounds=(0.0, 100.0))
    assert free["ci95"][0] < 0.0 and free["ci95"][1] > 100.0
    assert cut["ci95"] == [0.0, 100.0] and cut["estimate"] == free["estimate"] == pytest.approx(200 / 3)
    inside = cluster_mean_ci([40.0, 50.0, 60.0], threads, bounds=(0.0, 100.0))
    assert list(inside["ci95"]) == list(cluster_mean_ci([40.0, 50.0, 60.0], threads)["ci95"])
