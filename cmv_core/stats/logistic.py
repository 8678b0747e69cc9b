"""Logistic regression (IRLS, cluster-robust covariance) and the models built on it: the
length-controlled preference and the cross-validated length-only model of delta pairs.

numpy is imported inside functions (see ``cmv_core.stats.resampling``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

from cmv_core.stats.resampling import Z95


def sigmoid(x):
    import numpy as np

    return 1.0 / (1.0 + np.exp(-np.clip(x, -35, 35)))


def logistic_fit(
    X,
    y,
    *,
    clusters: Sequence[Hashable] | None = None,
    weights=None,
    ridge=1e-6,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> dict[str, Any]:
    """Logistic regression by Newton-Raphson (IRLS); ``y`` in [0, 1] (a tie is 1/2: a
    quasi-binomial response), optional case weights and a ridge against separation (a number, or
    one per coefficient).

    Returns coefficients and their covariance: the cluster-robust sandwich over ``clusters``
    (with the CR1 small-sample factor G/(G-1)) when given, else the model-based inverse Hessian."""
    import numpy as np

    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    n, k = X.shape
    beta = np.zeros(k)
    penalty = np.diag(np.broadcast_to(np.asarray(ridge, dtype=float), (k,)))
    for _ in range(max_iter):
        p = sigmoid(X @ beta)
        grad = X.T @ (w * (y - p)) - penalty @ beta
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + penalty
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if float(np.max(np.abs(step))) < tol:
            break
    p = sigmoid(X @ beta)
    hess = (X * (w * p * (1 - p))[:, None]).T @ X + penalty
    bread = np.linalg.inv(hess)
    if clusters is None:
        cov = bread
    else:
        scores = X * (w * (y - p))[:, None]
        groups: dict[Hashable, Any] = {}
        for row, g in zip(scores, clusters):
            groups[g] = groups.get(g, 0.0) + row
        meat = sum(np.outer(s, s) for s in groups.values())
        G = len(groups)
        factor = G / (G - 1) if G > 1 else 1.0
        cov = factor * bread @ meat @ bread
    return {"coef": beta, "cov": cov, "n": n, "n_clusters": None if clusters is None else len(set(clusters))}


def length_controlled_preference(
    rows: Sequence[dict[str, Any]],
    *,
    features: Sequence[str],
    intercept_ridge: float = 1.0,
    feature_ridge: float = 0.01,
) -> dict[str, Any]:
    """AlpacaEval-2-style length-controlled preference, paired and clustered.

    One row per judged order: ``group`` (the comparison), ``y`` (1 = side a preferred, 0 = b,
    1/2 = tie), ``thread``, and the named ``features`` (differences a - b, e.g. tanh(length
    difference / sd), shown-first +1/-1, truncated, meta preamble). One logistic model over all
    comparisons: an intercept per comparison plus shared feature coefficients, so a length effect
    learnt where lengths vary also explains a comparison where one side is always longer. The
    preference at equal length and style is sigmoid(intercept of the comparison), with a 95%
    interval from its thread-clustered standard error. Intercepts are ridge-penalised towards 0
    (no preference) more than the slopes: a judge that always picks the longer reply separates
    the data perfectly, and in a comparison where one side is always longer the data cannot tell
    an intercept from the length slope; the prior says the shared slope, learnt where lengths
    vary, explains it. (On data that do not separate the penalties are negligible.)
    Constant features cannot be estimated: they are dropped and named in ``dropped``."""
    import numpy as np

    if not rows:
        return {"n": 0, "by_group": {}, "coef": {}, "dropped": list(features)}
    groups = sorted({r["group"] for r in rows})
    used = [f for f in features if len({r[f] for r in rows}) > 1]
    X = np.array([[1.0 if r["group"] == g else 0.0 for g in groups] + [float(r[f]) for f in used] for r in rows])
    y = np.array([float(r["y"]) for r in rows])
    penalty = [intercept_ridge] * len(groups) + [feature_ridge] * len(used)
    fit = logistic_fit(X, y, clusters=[r["thread"] for r in rows], ridge=penalty)
    by_group = {}
    for i, g in enumerate(groups):
        b0, se0 = float(fit["coef"][i]), float(math.sqrt(max(fit["cov"][i, i], 0.0)))
        mine = [r for r in rows if r["group"] == g]
        lengths = [float(r.get("length", 0.0)) for r in mine]
        by_group[g] = {
            "n": len(mine),
            "n_threads": len({r["thread"] for r in mine}),
            # one side always longer: this comparison alone cannot tell length from quality
            "one_sided_length": all(x > 0 for x in lengths) or all(x < 0 for x in lengths),
            "raw": sum(float(r["y"]) for r in mine) / len(mine),
            "estimate": float(sigmoid(b0)),
            "ci95": (float(sigmoid(b0 - Z95 * se0)), float(sigmoid(b0 + Z95 * se0))),
            "intercept": b0,
            "intercept_se": se0,
        }
    k = len(groups)
    return {
        "n": len(rows),
        "n_threads": fit["n_clusters"],
        "by_group": by_group,
        "coef": {f: float(c) for f, c in zip(used, fit["coef"][k:])},
        "coef_se": {f: float(math.sqrt(max(fit["cov"][k + i, k + i], 0.0))) for i, f in enumerate(used)},
        "dropped": [f for f in features if f not in used],
    }


def cv_length_model(
    length_diff: Sequence[float], clusters: Sequence[Hashable], *, folds: int = 5, seed: int = 0
) -> list[float]:
    """Cross-validated P(winner) from a length-only logistic model, one value per pair.

    ``length_diff`` = words(winner) - words(loser). The feature is tanh(diff / sd) and each pair is
    seen in both orientations (feature labelled 1, its negative labelled 0) with no intercept, so
    the model cannot learn which side is listed first. Folds are by thread; each pair is predicted
    by a model fitted on the other folds."""
    import numpy as np

    diffs = np.asarray(length_diff, dtype=float)
    if len(diffs) == 0:
        return []
    groups = sorted(set(clusters), key=str)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    fold_of = {groups[g]: i % max(1, min(folds, len(groups))) for i, g in enumerate(order)}
    fold = np.array([fold_of[c] for c in clusters])
    out = np.full(len(diffs), 0.5)
    for f in sorted(set(fold.tolist())):
        train = fold != f
        if not train.any():
            continue
        sd = float(np.std(diffs[train])) or 1.0
        x = np.tanh(diffs[train] / sd)
        X = np.concatenate([x, -x])[:, None]
        y = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
        beta = logistic_fit(X, y, ridge=1e-3)["coef"]
        out[~train] = sigmoid(np.tanh(diffs[~train] / sd) * beta[0])
    return [float(p) for p in out]
