"""Intervals and rates of the report, and the thresholds its readings use (when the data can tell)."""

from __future__ import annotations

import math
from typing import Any

from cmv_core.stats.resampling import Z95

MIN_THREADS = 10  # fewer threads than this: the report says the data cannot tell
ALPHA = 0.05


def bootstrap_mean_ci(
    values: list[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of independent values; seeded, so a rerun gives the
    same numbers. Not for thread-clustered means: the report's intervals on a mean or a paired
    difference are t intervals on thread means (``cmv_core.stats.resampling.cluster_mean_ci``),
    which hold with few threads where a percentile bootstrap under-covers."""
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


def resolution(
    estimate: float | None, ci: tuple[float, float] | None, *, null: float, n_threads: int
) -> dict[str, Any] | None:
    """Can the interval tell the effect seen from none? ``tells`` is False when the interval contains
    ``null``: then its half-width is at least the effect seen (for the symmetric t interval), and
    ``threads_needed`` is about how many threads the same spread would need for an interval whose
    half-width is the effect seen (the half-width shrinks as 1 / sqrt(threads)); None when the
    effect seen is zero or there is no interval."""
    if estimate is None or ci is None:
        return None
    lo, hi = ci
    effect, half = estimate - null, (hi - lo) / 2.0
    tells = not lo <= null <= hi
    return {
        "effect": effect,
        "half_width": half,
        "tells": tells,
        "threads_needed": math.ceil(n_threads * (half / effect) ** 2) if effect != 0 and not tells else None,
    }


def wilson_ci(successes: float, n: int) -> tuple[float, float] | None:
    """Wilson score interval for a proportion: sane at 0% and 100% and for small n."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_with_ci(count: float, n: int) -> dict[str, Any]:
    """A rate with its count and Wilson interval (rate None when n is 0)."""
    return {"rate": (count / n) if n else None, "count": count, "ci95": wilson_ci(count, n)}
