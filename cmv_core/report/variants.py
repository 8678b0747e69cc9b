"""The report's numbers on the compared variants: single-answer grades, paired score differences,
pairwise preferences, the length-controlled preference and the Bradley-Terry scale anchored on people."""

from __future__ import annotations

from typing import Any

from cmv_core.report.intervals import rate_with_ci
from cmv_core.report.units import LIKERT, length_control_rows, score_of, thread_of
from cmv_core.stats.bradley_terry import bradley_terry_bootstrap
from cmv_core.stats.comparisons import OUTCOME_SCORE, paired_difference, preference
from cmv_core.stats.logistic import length_controlled_preference
from cmv_core.stats.resampling import cluster_mean_ci

LC_FEATURES = ("length", "shown_first", "truncated", "preamble")
HUMAN_PREFIX = "human"


def summarize_single(rows: list[dict], criteria: list[str], *, n_boot: int, seed: int) -> dict:
    """Per variant and criterion: the mean of per-thread means with a t interval on thread means
    (``cmv_core.stats.small_sample``), of parsed scores (and of the probability-weighted scores where the judge gave
    log-probabilities), plus a histogram of the parsed scores. (``n_boot`` and ``seed`` are unused:
    the interval is analytic.)"""
    del n_boot, seed
    variants: dict[str, dict] = {}
    for variant in sorted({r["variant"] for r in rows}):
        vrows = [r for r in rows if r["variant"] == variant]
        ok = [r for r in vrows if r["status"] == "ok"]
        per_crit = {}
        for crit in criteria:
            scored = [r for r in ok if r["scores"].get(crit) is not None]
            wrows = [r for r in ok if (r.get("weighted_scores") or {}).get(crit) is not None]
            parsed = cluster_mean_ci([r["scores"][crit] for r in scored], [thread_of(r) for r in scored])
            weighted = cluster_mean_ci([r["weighted_scores"][crit] for r in wrows], [thread_of(r) for r in wrows])
            per_crit[crit] = {
                "n": len(scored),
                "n_threads": parsed["n_threads"],
                "mean": parsed["estimate"],
                "ci95": parsed["ci95"],
                "n_weighted": len(wrows),
                "weighted_mean": weighted["estimate"],
                "weighted_ci95": weighted["ci95"],
                "histogram": {str(k): sum(1 for r in scored if r["scores"][crit] == k) for k in LIKERT},
            }
        variants[variant] = {"n": len(vrows), "n_ok": len(ok), "n_failed": len(vrows) - len(ok), "criteria": per_crit}
    return {"criteria": list(criteria), "variants": variants}


def summarize_single_differences(
    rows: list[dict], criteria: list[str], comparisons: list[tuple[str, str]], *, n_boot: int, seed: int
) -> dict:
    """Per comparison (a, b) and criterion: the paired per-thread difference of a's and b's scores
    on the same prompts (probability-weighted where available), t interval and t-test p-value.
    Prompts where either side failed are excluded from both and counted."""
    by_variant: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[str(r["item_id"])] = r
    out: dict[str, dict] = {}
    for a, b in comparisons:
        if a not in by_variant or b not in by_variant:
            continue
        ra, rb = by_variant[a], by_variant[b]
        clusters = {i: thread_of(r) for i, r in {**rb, **ra}.items()}
        per = {}
        for ci, crit in enumerate(criteria):
            per[crit] = paired_difference(
                {i: score_of(r, crit) for i, r in ra.items()},
                {i: score_of(r, crit) for i, r in rb.items()},
                clusters,
                n_boot=n_boot,
                seed=seed + ci,
            )
        out[f"{a}_vs_{b}"] = {"a": a, "b": b, "criteria": per}
    return out


def summarize_pairwise(rows: list[dict], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Win/tie/loss of side ``a`` per comparison. A pair whose two orders disagree counts as a
    tie (MT-Bench's convention) and is also counted as inconsistent, so it is never hidden.
    ``preference`` is P(a beats b) = win + tie/2, thread-weighted, with a t interval on thread
    means and the t test's p-value against 1/2 (sign-flip p-value beside it); failed pairs are excluded and counted."""
    out: dict[str, dict] = {}
    for comp in sorted({r["comparison"] for r in rows}):
        crows = [r for r in rows if r["comparison"] == comp]
        ok = [r for r in crows if r["status"] == "ok"]
        n = len(ok)
        counts = {k: sum(1 for r in ok if r["outcome"] == k) for k in ("win", "tie", "loss")}
        consistent = sum(1 for r in ok if r["consistent"])
        orders = [o for r in ok for o in r["orders"] if o["verdict"] in ("A", "B")]
        out[comp] = {
            "a": crows[0]["a"],
            "b": crows[0]["b"],
            "n": n,
            "n_failed": len(crows) - n,
            "win": rate_with_ci(counts["win"], n),
            "tie": rate_with_ci(counts["tie"], n),
            "loss": rate_with_ci(counts["loss"], n),
            "inconsistent": n - consistent,
            "position_consistency": rate_with_ci(consistent, n),
            # Share of decisive single-order verdicts that picked the first-shown reply: 0.5 is unbiased.
            "first_position_preference": rate_with_ci(sum(1 for o in orders if o["verdict"] == "A"), len(orders)),
            "preference": preference(
                [r["outcome"] for r in crows], [thread_of(r) for r in crows], n_boot=n_boot, seed=seed
            ),
        }
    return out


def summarize_length_control(pairwise_rows: list[dict], probe_rows: list[dict], *, n_boot: int, seed: int) -> dict:
    """The preference at equal length and style per comparison, beside the raw one, and the
    length probe: P(the judge prefers the longer of two versions of the same reply)."""
    lc = length_controlled_preference(length_control_rows(pairwise_rows), features=list(LC_FEATURES))
    probe = (
        preference([r["outcome"] for r in probe_rows], [thread_of(r) for r in probe_rows], n_boot=n_boot, seed=seed)
        if probe_rows
        else None
    )
    return {"model": lc, "probe_prefer_longer": probe}


def summarize_scale(pairwise_rows: list[dict], *, base: str, reference: str, n_boot: int, seed: int) -> dict:
    """Bradley-Terry strengths over every pairwise verdict (one comparison per pair, a tie = 1/2),
    anchored at ``base`` = 0, and for each other model the share of the base-to-human-winner gap it
    closes, with thread-cluster bootstrap intervals."""
    ok = [r for r in pairwise_rows if r["status"] == "ok"]
    comps = [(r["a"], r["b"], OUTCOME_SCORE[r["outcome"]]) for r in ok]
    threads = [thread_of(r) for r in ok]
    players = sorted({p for a, b, _ in comps for p in (a, b)})
    out: dict[str, Any] = {"base": base, "reference": reference, "players": players, "models": {}}
    if not comps:
        return out
    models = [p for p in players if p not in (base, reference) and not p.startswith(HUMAN_PREFIX)]
    first = None
    for i, m in enumerate(models or [None]):
        fit = bradley_terry_bootstrap(
            comps, threads, model=m or base, base=base, reference=reference, n_boot=min(n_boot, 500), seed=seed + i
        )
        first = first or fit
        if m is not None:
            out["models"][m] = {"gap_closed": fit["gap_closed"], "gap_closed_ci95": fit["gap_closed_ci95"]}
    out["strengths"] = first["strengths"]
    out["strengths_ci95"] = first["strengths_ci95"]
    out["n_comparisons"], out["n_threads"] = first["n_comparisons"], first["n_threads"]
    return out
