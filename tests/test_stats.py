"""Known-answer tests of cmv_core.stats: clustering, paired tests, scoring rules, logistic models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmv_core.stats.bradley_terry import bradley_terry_bootstrap
from cmv_core.stats.comparisons import (
    binomial_two_sided,
    mcnemar_exact,
    paired_accuracy_test,
    paired_difference,
    preference,
    two_sample_difference,
)
from cmv_core.stats.logistic import cv_length_model, length_controlled_preference, logistic_fit, sigmoid
from cmv_core.stats.resampling import cluster_bootstrap_ci, sign_flip_pvalue
from cmv_core.stats.scoring import auc, brier, paired_auc


def test_identical_items_in_a_thread_give_the_interval_of_one_item_per_thread():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 1.0, 50).tolist()
    independent = cluster_bootstrap_ci(values, list(range(50)), n_boot=2000, seed=7)
    copies = [v for v in values for _ in range(5)]
    threads = [t for t in range(50) for _ in range(5)]
    clustered = cluster_bootstrap_ci(copies, threads, n_boot=2000, seed=7)
    assert clustered["n_threads"] == 50 and clustered["n_items"] == 250
    assert clustered["estimate"] == pytest.approx(independent["estimate"])
    assert clustered["ci95"] == pytest.approx(independent["ci95"])
    # Treating the 250 copies as independent would give an interval about sqrt(5) times narrower.
    naive = cluster_bootstrap_ci(copies, list(range(250)), n_boot=2000, seed=7)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(naive) < 0.6 * width(clustered)


def test_threads_weigh_equally_whatever_their_number_of_items():
    # one thread with 9 items at 1.0, one with a single item at 0.0: the thread mean is 0.5
    out = cluster_bootstrap_ci([1.0] * 9 + [0.0], ["a"] * 9 + ["b"], n_boot=100)
    assert out["estimate"] == pytest.approx(0.5)


def test_cluster_bootstrap_covers_a_known_effect_about_95_percent():
    rng = np.random.default_rng(2026)
    true, covered, reps = 0.4, 0, 1000
    for rep in range(reps):
        sizes = rng.integers(1, 7, 40)  # 40 threads, 1-6 items each, strongly correlated within
        thread_effect = rng.normal(0, 1.0, 40)
        values, clusters = [], []
        for t, (k, u) in enumerate(zip(sizes, thread_effect)):
            values += (true + u + rng.normal(0, 0.5, k)).tolist()
            clusters += [t] * int(k)
        lo, hi = cluster_bootstrap_ci(values, clusters, n_boot=1000, seed=rep)["ci95"]
        covered += lo <= true <= hi
    # within 2.5 points of the nominal 95% (a 90% interval, or a 99% one, is outside: about 3.6 SE
    # of a coverage estimated from 1,000 replications)
    assert abs(covered / reps - 0.95) <= 0.025, covered


def test_sign_flip_pvalue_exact_and_monte_carlo():
    # 10 threads all positive: only the all-plus and all-minus flips are as extreme: p = 2/1024
    assert sign_flip_pvalue([1.0] * 10, list(range(10))) == pytest.approx(2 / 1024)
    assert sign_flip_pvalue([1.0, -1.0] * 5, list(range(10))) == pytest.approx(1.0)
    p = sign_flip_pvalue([0.5] * 30, list(range(30)), n_perm=2000)
    assert p == pytest.approx(1 / 2001)
    # identical items in a thread do not add evidence: 3 threads x 100 copies is still p = 2/8
    assert sign_flip_pvalue([1.0] * 300, [i // 100 for i in range(300)]) == pytest.approx(0.25)


def test_mcnemar_textbook_values():
    # b = 1, c = 9: 2 * P(X <= 1 | n = 10, 1/2) = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    # b = 2, c = 8: 2 * (1 + 10 + 45) / 1024 = 0.109375
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_accuracy_test_counts_discordant_pairs_on_the_same_pairs():
    judge = [1, 1, 1, 0, 1, 0.5, 1, 1]
    length = [1, 0, 0, 0, 0, 0.5, 0, 1]
    out = paired_accuracy_test(judge, length, list(range(8)), n_boot=200)
    assert out["discordant_first_better"] == 4 and out["discordant_second_better"] == 0
    assert out["p_value"] == pytest.approx(2 / 16)
    assert out["difference"] == pytest.approx(0.5)


def test_paired_difference_excludes_failures_from_both_sides():
    a = {"i1": 6.0, "i2": 5.0, "i3": None, "i4": 7.0}
    b = {"i1": 3.0, "i2": 4.0, "i3": 2.0, "i5": 1.0}
    clusters = {"i1": "t1", "i2": "t1", "i3": "t2", "i4": "t3", "i5": "t3"}
    out = paired_difference(a, b, clusters, n_boot=200)
    assert out["n_items"] == 2 and out["n_excluded"] == 3 and out["n_threads"] == 1
    assert out["estimate"] == pytest.approx(2.0)  # thread t1: mean of 3 and 1


def test_preference_is_win_plus_half_tie():
    out = preference(["win", "win", "tie", "loss", None], ["a", "b", "c", "d", "e"], n_boot=200)
    assert out["estimate"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert out["n_excluded"] == 1 and out["null"] == 0.5
    # per-thread d = [.5, .5, 0, -.5]: every one of the 16 sign flips is at least as extreme
    assert out["p_value_sign_flip"] == 1.0
    # the t test (the report's p-value, dual of its interval): mean 1/8, s^2 = 11/48, t = 0.522 on 3 df,
    # two-sided p = 1 - (2/pi)(theta + sin theta cos theta), theta = atan(t / sqrt(3)) (A&S 26.7.3)
    t = 0.125 / math.sqrt(11 / 48 / 4)
    theta = math.atan(t / math.sqrt(3))
    assert out["p_value"] == pytest.approx(1 - 2 / math.pi * (theta + math.sin(theta) * math.cos(theta)), abs=1e-12)
    # 5 wins and 1 loss in 6 threads: the sign flip is the exact binomial 2 * (1 + 6) / 64
    out = preference(["win"] * 5 + ["loss"], list("abcdef"), n_boot=200)
    assert out["p_value_sign_flip"] == pytest.approx(14 / 64, abs=1e-12)
    # t = (1/3) / sqrt((1/6) / 6) = 2 on 5 df: p = 1 - (2/pi)(theta + sin theta (cos theta + 2/3 cos^3 theta))
    theta = math.atan(2 / math.sqrt(5))
    c = math.cos(theta)
    assert out["p_value"] == pytest.approx(1 - 2 / math.pi * (theta + math.sin(theta) * (c + 2 / 3 * c**3)), abs=1e-12)


@pytest.mark.parametrize("k, n", [(0, 1), (0, 10), (1, 10), (3, 10), (5, 10), (7, 20), (12, 30), (40, 100)])
def test_exact_binomial_matches_the_closed_form(k, n):
    # P(X <= min(k, n - k)) under Binomial(n, 1/2), doubled, capped at 1: the textbook sign test
    m = min(k, n - k)
    expected = min(1.0, 2 * sum(math.comb(n, i) * 0.5**n for i in range(m + 1)))
    assert binomial_two_sided(k, n) == pytest.approx(expected, abs=1e-6)
    assert binomial_two_sided(n - k, n) == pytest.approx(expected, abs=1e-6)
    assert mcnemar_exact(k, n - k) == pytest.approx(expected, abs=1e-6)


def test_auc_and_brier_known_values():
    assert auc([3, 2], [1, 2]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert paired_auc([1, 1, 1]) == 1.0
    assert paired_auc([0, 0]) == 0.5
    # d = [2, -1]: positives {2, -1}, negatives {-2, 1}: 2>-2, 2>1, -1>-2, -1<1 -> 3/4
    assert paired_auc([2, -1]) == pytest.approx(0.75)
    assert brier([1.0, 0.5, 0.0]) == pytest.approx((0 + 0.25 + 1) / 3)


def test_logistic_fit_recovers_coefficients_and_clustered_se_grows_with_copies():
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    y = (rng.random(4000) < sigmoid(0.5 + 1.5 * x)).astype(float)
    X = np.column_stack([np.ones_like(x), x])
    fit = logistic_fit(X, y)
    assert fit["coef"] == pytest.approx([0.5, 1.5], abs=0.15)
    # every row duplicated 4x within a cluster: same coefficients, clustered SE = the original's
    Xd, yd = np.repeat(X, 4, axis=0), np.repeat(y, 4)
    clustered = logistic_fit(Xd, yd, clusters=np.repeat(np.arange(4000), 4).tolist())
    naive = logistic_fit(Xd, yd)
    se = lambda f: math.sqrt(f["cov"][1, 1])  # noqa: E731
    assert clustered["coef"] == pytest.approx(fit["coef"], abs=1e-6)
    assert se(clustered) == pytest.approx(2 * se(naive), rel=0.1)


def test_length_controlled_preference_removes_a_pure_length_judge():
    # A judge that always prefers the longer reply. In "ft_vs_base" ft is always longer (raw 100%);
    # in "ft_vs_human" lengths vary, which identifies the shared length coefficient. (Replies within
    # a few words of each other would leave a step-function judge partly unexplained by the tanh.)
    rng = np.random.default_rng(3)
    rows = []
    for t in range(60):
        for group, diff in (
            ("ft_vs_base", abs(rng.normal(0, 40)) + 20),
            ("ft_vs_human", rng.choice([-1, 1]) * (abs(rng.normal(0, 40)) + 20)),
        ):
            for shown_first in (1, -1):
                rows.append(
                    {
                        "group": group,
                        "y": 1.0 if diff > 0 else 0.0,
                        "thread": t,
                        "length": math.tanh(diff / 40),
                        "first": shown_first,
                        "truncated": 0,
                    }
                )
    out = length_controlled_preference(rows, features=["length", "first", "truncated"])
    base = out["by_group"]["ft_vs_base"]
    assert base["raw"] == 1.0 and base["one_sided_length"]
    assert not out["by_group"]["ft_vs_human"]["one_sided_length"]
    assert base["estimate"] == pytest.approx(0.5, abs=0.1)
    assert out["by_group"]["ft_vs_human"]["estimate"] == pytest.approx(0.5, abs=0.1)
    assert out["coef"]["length"] > 2 and out["dropped"] == ["truncated"]
    assert abs(out["coef"]["first"]) < 0.2


def test_cv_length_model_predicts_held_out_pairs():
    diffs = [50, 40, 30, -5, 20, 60, 10, -20]
    p = cv_length_model(diffs, list(range(8)), folds=4)
    assert len(p) == 8 and all(0 < x < 1 for x in p)
    assert all((x > 0.5) == (d > 0) for x, d in zip(p, diffs))


def test_cv_length_model_does_not_see_the_labels_of_the_pairs_it_predicts():
    # Swapping the winner and loser of one thread's pairs (only that thread's labels) must not change
    # the model that predicts them: their P(winner) becomes exactly 1 - the old one. A model fitted
    # on data that includes those pairs (leakage) moves with their labels, and fails this.
    rng = np.random.default_rng(11)
    diffs = rng.normal(15, 30, 40).tolist()
    threads = [i // 2 for i in range(40)]
    before = cv_length_model(diffs, threads, folds=5)
    for thread in (0, 7, 19):
        swapped = [-d if t == thread else d for d, t in zip(diffs, threads)]
        after = cv_length_model(swapped, threads, folds=5)
        mine = [i for i, t in enumerate(threads) if t == thread]
        assert [after[i] for i in mine] == pytest.approx([1 - before[i] for i in mine], abs=1e-12)
        # and the other folds' models did see the swap (so the check above is not vacuous)
        assert max(abs(a - b) for i, (a, b) in enumerate(zip(after, before)) if i not in mine) > 1e-6


def test_bradley_terry_recovers_order_and_gap():
    rng = np.random.default_rng(5)
    true = {"base": 0.0, "finetuned": 0.6, "human": 1.2}
    comps, clusters = [], []
    for t in range(400):
        for a, b in (("finetuned", "base"), ("human", "base"), ("finetuned", "human")):
            p = 1 / (1 + math.exp(-(true[a] - true[b])))
            comps.append((a, b, float(rng.random() < p)))
            clusters.append(t)
    out = bradley_terry_bootstrap(comps, clusters, model="finetuned", base="base", reference="human", n_boot=100)
    s = out["strengths"]
    assert s["base"] == 0.0 and s["base"] < s["finetuned"] < s["human"]
    assert s["finetuned"] == pytest.approx(0.6, abs=0.15) and s["human"] == pytest.approx(1.2, abs=0.15)
    assert out["gap_closed"] == pytest.approx(0.5, abs=0.12)
    lo, hi = out["gap_closed_ci95"]
    assert lo < out["gap_closed"] < hi and lo < 0.5 < hi


def test_two_sample_difference_exact_permutation_and_clusters():
    # 5 threads right, 5 wrong: only the two extreme splits of C(10, 5) = 252 are as far apart: p = 2/252
    out = two_sample_difference([1.0] * 5, list("abcde"), [0.0] * 5, list("fghij"), n_boot=500)
    assert out["estimate"] == 1.0 and out["exact"] and out["p_value"] == pytest.approx(2 / 252)
    assert out["ci95"] == (1.0, 1.0) and out["n_threads_first"] == out["n_threads_second"] == 5
    # the same two groups: no difference, p = 1
    same = two_sample_difference([1, 0, 1, 0], [1, 2, 3, 4], [0, 1, 0, 1], [5, 6, 7, 8], n_boot=200)
    assert same["estimate"] == 0.0 and same["p_value"] == pytest.approx(1.0)
    # copies of a pair in one thread add no evidence: 3 threads x 10 identical pairs is still 3 units
    copies = two_sample_difference(
        [1.0] * 30, [i // 10 for i in range(30)], [0.0] * 30, [100 + i // 10 for i in range(30)], n_boot=200
    )
    assert copies["n_items_first"] == 30 and copies["n_threads_first"] == 3
    assert copies["p_value"] == pytest.approx(2 / math.comb(6, 3))  # = 0.1: cannot tell
    # threads weigh equally within a group: thread x (9 pairs at 1) and y (1 pair at 0) average 0.5
    weighted = two_sample_difference([1.0] * 9 + [0.0], ["x"] * 9 + ["y"], [0.5], ["z"], n_boot=100)
    assert weighted["estimate"] == pytest.approx(0.0)
    empty = two_sample_difference([], [], [1.0], ["a"])
    assert empty["estimate"] is None and empty["p_value"] is None and empty["n_threads_second"] == 1


def test_two_sample_difference_monte_carlo_matches_the_exact_tail_and_rejects_about_5_percent():
    # 16 threads right (1), against 8 right and 8 wrong: |diff| >= 0.5 iff the first group draws all its
    # 16 from the 24 ones or holds all 8 zeros: 2 * C(24, 16) / C(32, 16)
    out = two_sample_difference([1.0] * 16, range(16), [1.0, 0.0] * 8, range(16, 32), n_boot=500, seed=1)
    assert not out["exact"] and out["estimate"] == pytest.approx(0.5)
    assert out["p_value"] == pytest.approx(2 * math.comb(24, 16) / math.comb(32, 16), abs=0.002)
    assert out["ci95"][0] > 0
    # under the null (both groups the same coin), the test rejects at 5% about 5% of the time
    rng = np.random.default_rng(7)
    rejections = sum(
        two_sample_difference(
            rng.integers(0, 2, 20).tolist(),
            range(20),
            rng.integers(0, 2, 20).tolist(),
            range(20, 40),
            n_boot=50,
            n_perm=1000,
            seed=rep,
        )["p_value"]
        < 0.05
        for rep in range(200)
    )
    assert rejections / 200 <= 0.09, rejections
