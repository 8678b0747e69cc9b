"""Comparisons of two sides over threads: paired differences, preferences, exact paired tests, two groups.

Paired comparisons keep only items where both sides have a value, and say how many were left out;
estimates, intervals and p-values are over threads (``cmv_core.stats.resampling``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

from cmv_core.stats.resampling import cluster_mean_ci, mean_or_none, mean_with_test, thread_means
from cmv_core.stats.small_sample import welch_interval

# ---------------------------------------------------------------- paired comparisons


def paired_difference(
    a: dict[str, float | None],
    b: dict[str, float | None],
    clusters: dict[str, Hashable],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean of a - b over items (by item id) where both sides have a value, averaged within a
    thread first; t interval on the threads' mean differences and the t test's p-value (sign-flip
    p-value beside it: ``mean_with_test``). Items where either side is missing
    or failed are left out of both sides and counted in ``n_excluded``."""
    ids = sorted(set(a) | set(b))
    both = [i for i in ids if a.get(i) is not None and b.get(i) is not None]
    out = mean_with_test([a[i] - b[i] for i in both], [clusters[i] for i in both], null=0.0, n_boot=n_boot, seed=seed)
    out["n_excluded"] = len(ids) - len(both)
    return out


OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def preference(
    outcomes: Sequence[str | None], clusters: Sequence[Hashable], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """P(a beats b) = win + tie/2 over pairwise outcomes ("win"/"tie"/"loss" for side a; None =
    failed, left out and counted), thread-weighted, with t interval and p-value against 0.5."""
    keep = [(OUTCOME_SCORE[o], c) for o, c in zip(outcomes, clusters) if o is not None]
    out = mean_with_test(
        [s for s, _ in keep], [c for _, c in keep], null=0.5, n_boot=n_boot, seed=seed, bounds=(0.0, 1.0)
    )
    out["n_excluded"] = len(outcomes) - len(keep)
    return out


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p-value at p = 1/2 (doubling the smaller tail, capped at 1)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar test: the discordant pairs (b: only the first is right, c: only the second)
    are Binomial(b + c, 1/2) under the null of equal accuracy."""
    return binomial_two_sided(b, b + c)


def paired_accuracy_test(
    first: Sequence[float], second: Sequence[float], clusters: Sequence[Hashable], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Two scorers of the same pairs (1 right, 0 wrong, 1/2 undecided): the difference in accuracy
    with a thread-clustered interval (t on the threads' mean differences), and an exact sign test
    on the discordant pairs (McNemar when both are 0/1): b = pairs where the first scores
    higher, c = where the second does."""
    if not (len(first) == len(second) == len(clusters)):
        raise ValueError("paired scores need the same pairs on both sides")
    b = sum(1 for x, y in zip(first, second) if x > y)
    c = sum(1 for x, y in zip(first, second) if x < y)
    del n_boot, seed  # the interval is analytic; kept so callers need not change
    diff = cluster_mean_ci([x - y for x, y in zip(first, second)], clusters)
    return {
        "n": len(first),
        "first": mean_or_none(first),
        "second": mean_or_none(second),
        "difference": diff["estimate"],
        "difference_ci95": diff["ci95"],
        "n_threads": diff["n_threads"],
        "discordant_first_better": b,
        "discordant_second_better": c,
        "p_value": mcnemar_exact(b, c),
    }


# ---------------------------------------------------------------- two independent groups

EXACT_PERMUTATIONS = 20000  # up to this many splits of the threads, the permutation test enumerates them


def two_sample_difference(
    first: Sequence[float],
    first_clusters: Sequence[Hashable],
    second: Sequence[float],
    second_clusters: Sequence[Hashable],
    *,
    n_boot: int = 2000,
    n_perm: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Two independent groups of items (e.g. calibration pairs before and after a date): the
    difference first - second of their thread-weighted means, Welch's t interval on the two groups'
    thread means (``cmv_core.stats.small_sample``: a bootstrap under-covers with few threads), and
    a two-sided permutation p-value.

    The unit is the thread: each group's items are averaged within a thread first (a thread's
    pairs share a post), and the permutation test reassigns whole threads between the groups,
    keeping the groups' thread counts (every split enumerated when there are at most
    ``EXACT_PERMUTATIONS``, else ``n_perm`` seeded draws). A label present in both groups is two
    units, one in each (it cannot happen when the groups are cut by a thread's creation time).
    With an empty group there is nothing to compare: estimate, interval and p-value are None; with
    one thread in a group its spread is unknown and the interval is None. ``n_boot`` is unused."""
    import numpy as np

    a, _ = thread_means(first, first_clusters)
    b, _ = thread_means(second, second_clusters)
    out: dict[str, Any] = {
        "estimate": None,
        "ci95": None,
        "p_value": None,
        "first": mean_or_none(a),
        "second": mean_or_none(b),
        "n_items_first": len(first),
        "n_items_second": len(second),
        "n_threads_first": len(a),
        "n_threads_second": len(b),
        "exact": None,
    }
    if not a or not b:
        return out
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    obs = float(xa.mean() - xb.mean())
    out["estimate"] = obs
    rng = np.random.default_rng(seed)
    out["ci95"] = welch_interval(a, b)["ci95"]

    out["p_value"], out["exact"] = _thread_permutation_pvalue(xa, xb, obs, rng, n_perm=n_perm)
    return out


def _thread_permutation_pvalue(xa, xb, obs: float, rng, *, n_perm: int) -> tuple[float, bool]:
    """Two-sided p-value of the difference of means ``obs`` by reassigning thread means between the
    groups (sizes kept), and whether every split was enumerated; else ``n_perm`` draws from ``rng``."""
    import itertools

    import numpy as np

    pooled = np.concatenate([xa, xb])
    n, k, total = len(pooled), len(xa), float(pooled.sum())
    tol = 1e-12 * max(1.0, abs(obs))

    def diffs(first_sums):  # the first group's sum fixes the difference of the two means
        return first_sums / k - (total - first_sums) / (n - k)

    if math.comb(n, k) <= EXACT_PERMUTATIONS:
        sums = np.array([pooled[list(idx)].sum() for idx in itertools.combinations(range(n), k)])
        return float((np.abs(diffs(sums)) >= abs(obs) - tol).mean()), True
    hits = 0
    for start in range(0, n_perm, 1000):  # in chunks: n_perm x n indices at once can be large
        m = min(1000, n_perm - start)
        perm = rng.random((m, n)).argsort(axis=1)[:, :k]
        hits += int((np.abs(diffs(pooled[perm].sum(axis=1))) >= abs(obs) - tol).sum())
    return float((1 + hits) / (1 + n_perm)), False
