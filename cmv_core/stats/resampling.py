"""Thread-clustered means, intervals and tests: the base of every statistic in the judge report
(``cmv_core.stats``: pure, typed functions over plain lists, seeded).

The unit is the thread. Test examples of one thread share a prompt (one example per winning
branch), often the same greedy reply and the same verdict, so they are not independent: every
estimate here first averages within a thread and then weighs threads equally. The report's
interval on a mean is the t interval on thread means (``cluster_mean_ci``; why t and not a
bootstrap: ``cmv_core.stats.small_sample``) with the t test's p-value, its dual; the exact
sign-flip test over threads is given beside it. The percentile cluster bootstrap stays as the
reference the coverage simulation shows under-covering at 10 threads.

numpy is imported inside functions (stage images that only import the module for its constants
need no numpy).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from cmv_core.stats.small_sample import t_interval

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval

# ---------------------------------------------------------------- grouping


def thread_means(values: Sequence[float], clusters: Sequence[Hashable]) -> tuple[list[float], list[int]]:
    """The mean value of each cluster (first-seen order) and the number of items in it."""
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for v, c in zip(values, clusters):
        sums[c] = sums.get(c, 0.0) + float(v)
        counts[c] = counts.get(c, 0) + 1
    return [sums[c] / counts[c] for c in sums], [counts[c] for c in sums]


def mean_or_none(xs: Sequence[float]) -> float | None:
    """The plain mean, None for no values."""
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------- intervals


def cluster_mean_ci(
    values: Sequence[float],
    clusters: Sequence[Hashable],
    *,
    null: float = 0.0,
    level: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Mean over threads of the per-thread mean, with the t interval on thread means (n_threads - 1
    degrees of freedom) and the t test's two-sided p-value against ``null`` (``p_value``).

    Copies of an item within a thread add no information (the interval of one item per thread);
    one thread gives the estimate with no interval (None). ``bounds``: the scale's ends (a rate's
    0 and 1, a percentile's 0 and 100); the interval is cut to them, since the mean cannot lie
    outside, which keeps its coverage and drops only impossible values a few threads' t interval reaches."""
    means, _ = thread_means(values, clusters)
    out = t_interval(means, null=null, level=level)
    if bounds is not None and out["ci95"] is not None:
        lo, hi = out["ci95"]
        out["ci95"] = [max(bounds[0], lo), min(bounds[1], hi)]
    return {**out, "n_items": len(values), "n_threads": len(means)}


def cluster_bootstrap_ci(
    values: Sequence[float], clusters: Sequence[Hashable], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Mean over threads of the per-thread mean, with a percentile interval from resampling threads:
    about 90% coverage at 10 threads (``tests/test_stats_coverage.py``), so the report uses
    ``cluster_mean_ci``; kept as the reference the coverage simulation compares against.

    With one item per thread this is the ordinary bootstrap of the mean; with k identical items
    per thread it is exactly the interval of one item per thread (the copies add no information)."""
    means, sizes = thread_means(values, clusters)
    out: dict[str, Any] = {"estimate": None, "ci95": None, "n_items": len(values), "n_threads": len(means)}
    if not means:
        return out
    import numpy as np

    data = np.asarray(means, dtype=float)
    out["estimate"] = float(data.mean())
    if len(data) == 1:
        out["ci95"] = (out["estimate"], out["estimate"])
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=(n_boot, len(data)))
    boot = data[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    out["ci95"] = (float(lo), float(hi))
    return out


def sign_flip_pvalue(
    values: Sequence[float], clusters: Sequence[Hashable], *, null: float = 0.0, n_perm: int = 10000, seed: int = 0
) -> float | None:
    """Two-sided p-value of "the mean of per-thread means equals ``null``" by flipping the sign of
    each thread's centred mean (exact enumeration up to 16 threads, else seeded Monte Carlo)."""
    means, _ = thread_means(values, clusters)
    if not means:
        return None
    import numpy as np

    d = np.asarray(means, dtype=float) - null
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, obs)
    n = len(d)
    if n <= 16:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        stats = np.abs((signs * d).mean(axis=1))
        return float((stats >= obs - tol).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, n))
    stats = np.abs((signs * d).mean(axis=1))
    return float((1 + (stats >= obs - tol).sum()) / (1 + n_perm))


def mean_with_test(
    values: Sequence[float],
    clusters: Sequence[Hashable],
    *,
    null: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Thread-weighted mean, t interval on thread means, t-test p-value against ``null`` (the dual of
    the interval), and the exact sign-flip p-value over threads beside it (``p_value_sign_flip``).
    ``n_boot`` is unused since the interval is analytic; kept so callers need not change."""
    del n_boot
    out = cluster_mean_ci(values, clusters, null=null, bounds=bounds)
    out["null"] = null
    out["p_value_sign_flip"] = sign_flip_pvalue(values, clusters, null=null, seed=seed)
    return out
