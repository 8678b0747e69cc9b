"""Intervals that hold with few threads: Student's t on thread means (one sample, paired, two groups).

Why t on thread means, and not a bootstrap. The unit is the thread (``cmv_core.stats.resampling``),
and a test set may have only 10-40 of them. The percentile bootstrap of n thread means is in effect
mean +- 1.96 * s * sqrt((n - 1) / n) / sqrt(n): the plug-in spread and a normal quantile, where 2.26
standard errors are needed at 10 threads (t with 9 degrees of freedom), so it covers about 90%, not
95%. BCa corrects skew and bias of the bootstrap distribution but keeps the plug-in spread and the
normal quantile, so it under-covers the same way at 10 threads (and its acceleration estimate is
itself noisy with 10 units). The t interval on cluster means is exact when thread means are normal
and threads independent, and robust enough at 10 threads for what a thread mean is here: an average
of a thread effect and reply noise over an unequal number of replies (a scale mixture of normals,
for which t is slightly conservative). ``tests/test_stats_coverage.py`` checks it by simulation at
10, 20 and 40 threads against the old percentile bootstrap.

The p-value is the t test's, the dual of the interval: "the interval contains the null" and
"p >= 1 - level" are the same statement, so the report never calls an effect shown while its
interval contains zero. The distribution functions are written out (regularised incomplete beta)
because the shared modules depend on numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (df need not be an integer)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (q in (0.5, 1)), by bisection on the two-sided tail."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile needs 0.5 < q < 1, got {q}")
    tail = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2.0


def _from_se(estimate: float, se: float, df: float, *, null: float, level: float) -> dict[str, Any]:
    """Interval and two-sided p-value of ``estimate`` with standard error ``se`` on ``df`` degrees of
    freedom; a zero standard error (every thread alike) gives a point interval and p = 0 or 1."""
    if se == 0.0:
        return {"ci95": (estimate, estimate), "se": 0.0, "df": df, "p_value": 1.0 if estimate == null else 0.0}
    half = t_quantile(0.5 + level / 2.0, df) * se
    return {
        "ci95": (estimate - half, estimate + half),
        "se": se,
        "df": df,
        "p_value": t_two_sided_p((estimate - null) / se, df),
    }


def t_interval(means: Sequence[float], *, null: float = 0.0, level: float = 0.95) -> dict[str, Any]:
    """Mean of the thread means with its t interval (n - 1 degrees of freedom) and the t test's
    p-value against ``null``. One thread has no spread to measure: interval and p-value are None."""
    n = len(means)
    out: dict[str, Any] = {"estimate": None, "ci95": None, "se": None, "df": None, "p_value": None}
    if n == 0:
        return out
    m = math.fsum(means) / n
    out["estimate"] = m
    if n == 1:
        return out
    var = math.fsum((x - m) ** 2 for x in means) / (n - 1)
    se = math.sqrt(var / n) if var > 1e-24 * max(1.0, m * m) else 0.0
    return {**out, **_from_se(m, se, n - 1, null=null, level=level)}


def welch_interval(first: Sequence[float], second: Sequence[float], *, level: float = 0.95) -> dict[str, Any]:
    """Difference of two independent groups' mean thread means, with Welch's t interval
    (Welch-Satterthwaite degrees of freedom) and p-value against 0; None where a group has fewer
    than two threads (its spread is unknown)."""
    out: dict[str, Any] = {"estimate": None, "ci95": None, "se": None, "df": None, "p_value": None}
    if not first or not second:
        return out
    na, nb = len(first), len(second)
    ma, mb = math.fsum(first) / na, math.fsum(second) / nb
    out["estimate"] = ma - mb
    if na < 2 or nb < 2:
        return out
    va = math.fsum((x - ma) ** 2 for x in first) / (na - 1) / na
    vb = math.fsum((x - mb) ** 2 for x in second) / (nb - 1) / nb
    se = math.sqrt(va + vb)
    if se <= 1e-12 * max(1.0, abs(ma), abs(mb)):
        return {**out, **_from_se(ma - mb, 0.0, na + nb - 2, null=0.0, level=level)}
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    return {**out, **_from_se(ma - mb, se, df, null=0.0, level=level)}
