"""Bradley-Terry strengths from pairwise verdicts, the share of the base-to-reference gap a model
closes, and thread-cluster bootstrap intervals of both.

numpy is imported inside functions (see ``cmv_core.stats.resampling``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

from cmv_core.stats.logistic import logistic_fit


def bradley_terry(
    comparisons: Sequence[tuple[str, str, float]], *, anchor: str | None = None, ridge: float = 1e-3
) -> dict[str, float]:
    """Bradley-Terry strengths (logit scale) from (a, b, score of a) comparisons, a tie = 1/2.

    Fitted as a logistic regression on indicator differences; ``anchor`` (default the first
    player in sorted order) is fixed at 0. A tiny ridge keeps a never-beaten player finite."""
    import numpy as np

    players = sorted({p for a, b, _ in comparisons for p in (a, b)})
    if not players:
        return {}
    anchor = anchor if anchor in players else players[0]
    free = [p for p in players if p != anchor]
    if not free:
        return {anchor: 0.0}
    col = {p: i for i, p in enumerate(free)}
    X = np.zeros((len(comparisons), len(free)))
    y = np.zeros(len(comparisons))
    for r, (a, b, s) in enumerate(comparisons):
        if a in col:
            X[r, col[a]] += 1.0
        if b in col:
            X[r, col[b]] -= 1.0
        y[r] = s
    beta = logistic_fit(X, y, ridge=ridge)["coef"]
    return {anchor: 0.0, **{p: float(beta[col[p]]) for p in free}}


def gap_closed(strengths: dict[str, float], model: str, base: str, reference: str) -> float | None:
    """(model - base) / (reference - base) on the Bradley-Terry scale: 0 = no better than base,
    1 = as strong as the reference (the human delta winner)."""
    if not {model, base, reference} <= set(strengths):
        return None
    denom = strengths[reference] - strengths[base]
    if abs(denom) < 1e-9:
        return None
    return (strengths[model] - strengths[base]) / denom


def bradley_terry_bootstrap(
    comparisons: Sequence[tuple[str, str, float]],
    clusters: Sequence[Hashable],
    *,
    model: str,
    base: str,
    reference: str,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Bradley-Terry strengths and the share of the gap closed, with thread-cluster bootstrap
    intervals (threads resampled with replacement, every comparison of a drawn thread kept)."""
    import numpy as np

    strengths = bradley_terry(comparisons, anchor=base)
    out: dict[str, Any] = {
        "strengths": strengths,
        "anchor": base if base in strengths else None,
        "gap_closed": gap_closed(strengths, model, base, reference),
        "model": model,
        "base": base,
        "reference": reference,
        "n_comparisons": len(comparisons),
        "n_threads": len(set(clusters)),
        "strengths_ci95": {},
        "gap_closed_ci95": None,
    }
    by_thread: dict[Hashable, list[tuple[str, str, float]]] = {}
    for comp, c in zip(comparisons, clusters):
        by_thread.setdefault(c, []).append(comp)
    threads = list(by_thread)
    if len(threads) < 2:
        return out
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {p: [] for p in strengths}
    gaps: list[float] = []
    for _ in range(n_boot):
        sample = [comp for t in rng.integers(0, len(threads), len(threads)) for comp in by_thread[threads[t]]]
        s = bradley_terry(sample, anchor=base)
        for p in draws:
            if p in s:
                draws[p].append(s[p])
        g = gap_closed(s, model, base, reference)
        if g is not None and math.isfinite(g):
            gaps.append(g)
    out["strengths_ci95"] = {
        p: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for p, v in draws.items() if v
    }
    if gaps:
        out["gap_closed_ci95"] = (float(np.quantile(gaps, 0.025)), float(np.quantile(gaps, 0.975)))
        out["gap_closed_boot_defined"] = len(gaps) / n_boot
    return out
