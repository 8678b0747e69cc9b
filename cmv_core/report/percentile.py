"""Percentile vs humans and the report's headline table (README, "Reading the report").

Each variant's reply is ranked among the human replies of its thread that the judge graded in the
same single-reply form (judgment rows of kind ``human_reply``): its percentile is the share of those
humans it scores above, ties counted half (100 above all, 0 below all, 50 tied with the median of an
odd set). The delta-winning humans, each ranked among the other humans of its thread, give the
ceiling that real persuasion reaches with this judge, and the share of the base-to-winner gap that a
model closes is (model - base) / (winners - base) over the threads where all three are ranked. Every
mean weighs threads equally and every interval is over threads (``cmv_core.stats``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from cmv_core.report.intervals import MIN_THREADS
from cmv_core.report.units import score_of, thread_of
from cmv_core.stats.comparisons import paired_difference
from cmv_core.stats.resampling import cluster_mean_ci, thread_means
from cmv_core.stats.small_sample import t_quantile

HUMAN_PREFIX = "human"
CEILING = "human delta winners"


def percentile_among(score: float, humans: Sequence[float]) -> float | None:
    """The percentile (0-100) of ``score`` among ``humans``: the share below it plus half the share
    tied with it; None when there are no humans."""
    if not humans:
        return None
    below = sum(1 for h in humans if h < score)
    tied = sum(1 for h in humans if h == score)
    return 100.0 * (below + 0.5 * tied) / len(humans)


def headline_criterion(criteria: Sequence[str]) -> str:
    """The criterion the percentile ranks by: persuasiveness, else the first one graded."""
    return "persuasiveness" if "persuasiveness" in criteria else criteria[0]


def _ci(values: list[float], clusters: list[Hashable]) -> dict[str, Any]:
    out = cluster_mean_ci(values, clusters, bounds=(0.0, 100.0))  # a percentile's scale
    return {"estimate": out["estimate"], "ci95": out["ci95"], "n_items": len(values), "n_threads": out["n_threads"]}


def gap_share(model: dict[str, float], base: dict[str, float], ceiling: dict[str, float]) -> dict[str, Any]:
    """(model - base) / (ceiling - base) of the means over the threads all three have, with Fieller's
    95% interval on the thread means (t on n - 1 degrees of freedom, as the report's other means):
    None when the gap itself cannot be told from zero (the interval is then unbounded)."""
    threads = sorted(set(model) & set(base) & set(ceiling))
    out: dict[str, Any] = {"estimate": None, "ci95": None, "n_threads": len(threads)}
    num = [model[t] - base[t] for t in threads]
    den = [ceiling[t] - base[t] for t in threads]
    n = len(threads)
    if not n or sum(den) <= 0:
        return out  # no thread, or base already at or above the delta winners: no gap to close
    a, b = sum(num) / n, sum(den) / n
    out["estimate"] = a / b
    if n < 2:
        return out
    s11, s22, s12 = (
        sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (n - 1) / n
        for xs, mx, ys, my in ((num, a, num, a), (den, b, den, b), (num, a, den, b))
    )
    t2 = t_quantile(0.975, n - 1) ** 2
    qa, qb, qc = b * b - t2 * s22, a * b - t2 * s12, a * a - t2 * s11
    disc = qb * qb - qa * qc
    if qa > 0 and disc >= 0:
        out["ci95"] = ((qb - disc**0.5) / qa, (qb + disc**0.5) / qa)
    return out


def _humans_by_thread(human_rows: list[dict], criterion: str) -> dict[str, list[tuple[str, bool, float]]]:
    """(reply id, delta, score) of each graded human reply, by thread; failed grades left out."""
    out: dict[str, list[tuple[str, bool, float]]] = {}
    for r in human_rows:
        score = score_of(r, criterion)
        if score is not None:
            out.setdefault(thread_of(r), []).append((r["reply_id"], bool(r.get("delta")), score))
    return out


def _per_thread(values: dict[str, float], clusters: dict[str, str]) -> dict[str, float]:
    ids = sorted(values)
    means, _ = thread_means([values[i] for i in ids], [clusters[i] for i in ids])
    return dict(zip(dict.fromkeys(clusters[i] for i in ids), means))


def summarize_percentile(
    single_rows: list[dict], human_rows: list[dict], criterion: str, *, base: str, n_boot: int, seed: int
) -> dict[str, Any]:
    """Per model variant the mean percentile of its reply among its thread's human replies, the
    delta winners' percentile among the other humans (the ceiling), each variant's paired difference
    from ``base`` and the share of the base-to-winner gap it closes."""
    humans = _humans_by_thread(human_rows, criterion)
    out: dict[str, Any] = {
        "criterion": criterion,
        "n_human_replies": len(human_rows),
        "n_human_failed": sum(1 for r in human_rows if r["status"] != "ok"),
        "n_threads_with_humans": len(humans),
        "variants": {},
        "ceiling": None,
        "vs_base": {},
        "gap_closed": {},
    }
    if not human_rows:
        return out
    item_pct: dict[str, dict[str, float]] = {}
    clusters: dict[str, str] = {}
    for r in single_rows:
        score, hs = score_of(r, criterion), humans.get(thread_of(r), [])
        if r["variant"].startswith(HUMAN_PREFIX) or score is None or not hs:
            continue
        item_pct.setdefault(r["variant"], {})[str(r["item_id"])] = percentile_among(score, [h for _, _, h in hs])
        clusters[str(r["item_id"])] = thread_of(r)
    ceiling: dict[str, float] = {}  # "<thread>\x1f<reply>" -> percentile among the thread's other humans
    for thread, hs in humans.items():
        for rid, delta, score in hs:
            others = [h for other, _, h in hs if other != rid]
            if delta and others:
                ceiling[f"{thread}\x1f{rid}"] = percentile_among(score, others)
    ceiling_threads = {key: key.split("\x1f")[0] for key in ceiling}
    out["ceiling"] = _ci(list(ceiling.values()), list(ceiling_threads.values()))
    per_thread_ceiling = _per_thread(ceiling, ceiling_threads)
    for i, variant in enumerate(sorted(item_pct)):
        vals = item_pct[variant]
        out["variants"][variant] = _ci(list(vals.values()), [clusters[k] for k in vals])
        n_items = sum(1 for r in single_rows if r["variant"] == variant)
        out["variants"][variant]["n_excluded"] = n_items - len(vals)
        if variant != base and base in item_pct:
            out["vs_base"][variant] = paired_difference(vals, item_pct[base], clusters, n_boot=n_boot, seed=seed + i)
            out["gap_closed"][variant] = gap_share(
                _per_thread(vals, clusters),
                _per_thread(item_pct[base], clusters),
                per_thread_ceiling,
            )
    return out


def _flip(pref: dict) -> dict:
    """P(b preferred) from a's preference: 1 - estimate, the interval mirrored."""
    ci = pref.get("ci95")
    return {
        "estimate": None if pref["estimate"] is None else 1.0 - pref["estimate"],
        "ci95": None if ci is None else (1.0 - ci[1], 1.0 - ci[0]),
        "n_threads": pref["n_threads"],
    }


def _win_vs_base(pairwise: dict, variant: str, base: str) -> dict | None:
    if f"{variant}_vs_{base}" in pairwise:
        p = pairwise[f"{variant}_vs_{base}"]["preference"]
        return {"estimate": p["estimate"], "ci95": p["ci95"], "n_threads": p["n_threads"]}
    if f"{base}_vs_{variant}" in pairwise:
        return _flip(pairwise[f"{base}_vs_{variant}"]["preference"])
    return None


def _strength(scale: dict, variant: str) -> dict | None:
    if variant not in (scale.get("strengths") or {}):
        return None
    ci = (scale.get("strengths_ci95") or {}).get(variant)
    return {"estimate": scale["strengths"][variant], "ci95": ci, "n_threads": scale.get("n_threads")}


def headline_rows(report: dict) -> list[dict]:
    """The headline table: per model variant (base first) and for the delta-winning humans, the
    percentile vs humans, P(preferred over base) and the Bradley-Terry strength, each with its
    interval and threads."""
    pct, pairwise, scale = report.get("percentile") or {}, report.get("pairwise") or {}, report.get("scale") or {}
    base, reference = report.get("base_variant", "base"), report.get("human_variant", "human")
    models = set(pct.get("variants") or {}) | {p for p in scale.get("players") or [] if not p.startswith(HUMAN_PREFIX)}
    models |= {pairwise[c]["a"] for c in pairwise} | {pairwise[c]["b"] for c in pairwise}
    models = {m for m in models if not m.startswith(HUMAN_PREFIX)}
    order = ([base] if base in models else []) + sorted(models - {base})
    rows = [
        {
            "variant": v,
            "percentile": (pct.get("variants") or {}).get(v),
            "win_vs_base": None if v == base else _win_vs_base(pairwise, v, base),
            "strength": _strength(scale, v),
        }
        for v in order
    ]
    if pct.get("ceiling") or reference in (scale.get("strengths") or {}):
        rows.append(
            {
                "variant": CEILING,
                "percentile": pct.get("ceiling"),
                "win_vs_base": _win_vs_base(pairwise, reference, base),
                "strength": _strength(scale, reference),
            }
        )
    return rows


def headline_sentence(report: dict) -> str:
    """One sentence the headline numbers support: the first model's percentile against base's, or
    that the test set is too small to tell them apart."""
    pct, base = report.get("percentile") or {}, report.get("base_variant", "base")
    if not pct.get("vs_base"):
        return "No model reply was ranked against both base and the thread's human replies: no percentile comparison."
    model = "finetuned" if "finetuned" in pct["vs_base"] else sorted(pct["vs_base"])[0]
    v, b, d = pct["variants"][model], pct["variants"][base], pct["vs_base"][model]
    if d["estimate"] is None or d["ci95"] is None:
        return f"`{model}` and `{base}` were never ranked on the same prompt: no percentile comparison."
    lo, hi = d["ci95"]
    ranks = (
        f"`{model}`'s replies rank at percentile {v['estimate']:.0f} among their thread's human replies "
        f"(`{base}` {b['estimate']:.0f}), {d['estimate']:+.0f} points [{lo:+.0f}, {hi:+.0f}] over {d['n_threads']} "
        "threads"
    )
    if d["n_threads"] < MIN_THREADS:
        return f"{ranks}: too few threads to tell an effect of this size from zero."
    if lo <= 0 <= hi:
        return f"{ranks}: not distinguishable from zero."
    share = (pct.get("gap_closed") or {}).get(model) or {}
    ceiling = (pct.get("ceiling") or {}).get("estimate")
    tail = (
        f"; the delta winners reach {ceiling:.0f}, so it closes {100 * share['estimate']:.0f}% of the gap"
        if ceiling is not None and share.get("estimate") is not None
        else ""
    )
    return f"{ranks}, a difference the interval separates from zero{tail}."
