"""Statistics for the judge report: pure, typed functions over plain lists, seeded.

The resampling unit is the thread. Test examples of one thread share a prompt (one example per
winning branch), often the same greedy reply and the same verdict, so they are not independent:
every estimate here first averages within a thread and then weighs threads equally, every
interval is a cluster (thread) bootstrap and every p-value a sign-flip (or exact binomial) test
over threads. Paired comparisons keep only items where both sides have a value, and say how many
were left out.

numpy is imported inside functions (stage images that only import the module for its constants
need no numpy).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

Z95 = 1.959963984540054


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


# ---------------------------------------------------------------- intervals


def cluster_bootstrap_ci(
    values: Sequence[float], clusters: Sequence[Hashable], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Mean over threads of the per-thread mean, with a percentile interval from resampling threads.

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
    values: Sequence[float], clusters: Sequence[Hashable], *, null: float = 0.0, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Thread-weighted mean, cluster-bootstrap 95% interval, sign-flip p-value against ``null``."""
    out = cluster_bootstrap_ci(values, clusters, n_boot=n_boot, seed=seed)
    out["null"] = null
    out["p_value"] = sign_flip_pvalue(values, clusters, null=null, seed=seed)
    return out


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
    thread first; interval and sign-flip p-value over threads. Items where either side is missing
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
    failed, left out and counted), thread-weighted, with interval and p-value against 0.5."""
    keep = [(OUTCOME_SCORE[o], c) for o, c in zip(outcomes, clusters) if o is not None]
    out = mean_with_test([s for s, _ in keep], [c for _, c in keep], null=0.5, n_boot=n_boot, seed=seed)
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
    with a thread-clustered interval, and an exact sign test on the discordant pairs (McNemar when
    both are 0/1): b = pairs where the first scores higher, c = where the second does."""
    if not (len(first) == len(second) == len(clusters)):
        raise ValueError("paired scores need the same pairs on both sides")
    b = sum(1 for x, y in zip(first, second) if x > y)
    c = sum(1 for x, y in zip(first, second) if x < y)
    diff = cluster_bootstrap_ci([x - y for x, y in zip(first, second)], clusters, n_boot=n_boot, seed=seed)
    return {
        "n": len(first),
        "first": _mean(first),
        "second": _mean(second),
        "difference": diff["estimate"],
        "difference_ci95": diff["ci95"],
        "n_threads": diff["n_threads"],
        "discordant_first_better": b,
        "discordant_second_better": c,
        "p_value": mcnemar_exact(b, c),
    }


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


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
    difference first - second of their thread-weighted means, a percentile interval from
    resampling threads within each group, and a two-sided permutation p-value.

    The unit is the thread: each group's items are averaged within a thread first (a thread's
    pairs share a post), and the permutation test reassigns whole threads between the groups,
    keeping the groups' thread counts (every split enumerated when there are at most
    ``EXACT_PERMUTATIONS``, else ``n_perm`` seeded draws). A label present in both groups is two
    units, one in each (it cannot happen when the groups are cut by a thread's creation time).
    With an empty group there is nothing to compare: estimate, interval and p-value are None."""
    import itertools

    import numpy as np

    a, _ = thread_means(first, first_clusters)
    b, _ = thread_means(second, second_clusters)
    out: dict[str, Any] = {
        "estimate": None,
        "ci95": None,
        "p_value": None,
        "first": _mean(a),
        "second": _mean(b),
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
    boot = xa[rng.integers(0, len(xa), size=(n_boot, len(xa)))].mean(axis=1) - xb[
        rng.integers(0, len(xb), size=(n_boot, len(xb)))
    ].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    out["ci95"] = (float(lo), float(hi))

    pooled = np.concatenate([xa, xb])
    n, k, total = len(pooled), len(xa), float(pooled.sum())
    tol = 1e-12 * max(1.0, abs(obs))

    def diffs(first_sums):  # the first group's sum fixes the difference of the two means
        return first_sums / k - (total - first_sums) / (n - k)

    if math.comb(n, k) <= EXACT_PERMUTATIONS:
        sums = np.array([pooled[list(idx)].sum() for idx in itertools.combinations(range(n), k)])
        out["p_value"] = float((np.abs(diffs(sums)) >= abs(obs) - tol).mean())
        out["exact"] = True
    else:
        hits = 0
        for start in range(0, n_perm, 1000):  # in chunks: n_perm x n indices at once can be large
            m = min(1000, n_perm - start)
            perm = rng.random((m, n)).argsort(axis=1)[:, :k]
            hits += int((np.abs(diffs(pooled[perm].sum(axis=1))) >= abs(obs) - tol).sum())
        out["p_value"] = float((1 + hits) / (1 + n_perm))
        out["exact"] = False
    return out


# ---------------------------------------------------------------- scoring rules


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney): P(positive > negative) + P(tie)/2."""
    if not positives or not negatives:
        return None
    import numpy as np

    pos = np.asarray(positives, dtype=float)[:, None]
    neg = np.asarray(negatives, dtype=float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def paired_auc(differences: Sequence[float]) -> float | None:
    """AUC of a score difference d = score(winner) - score(loser) with each pair seen in both
    orientations (d labelled 1, -d labelled 0): the order of the two replies carries no signal."""
    return auc(list(differences), [-d for d in differences])


def brier(p_true: Sequence[float]) -> float | None:
    """Mean of (1 - p)^2 where p is the probability given to what happened."""
    return _mean([(1.0 - p) ** 2 for p in p_true]) if p_true else None


# ---------------------------------------------------------------- logistic regression


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


# ---------------------------------------------------------------- Bradley-Terry


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
