"""Summarise judge verdicts: pure functions from judgment rows to numbers, text and plots.

Input rows are the lines of ``judgments.jsonl`` written by ``cmv_core.judging`` (one row per
single-answer grade, per pairwise comparison with both orders inside, per calibration pair).
Nothing here calls a judge or touches storage; plots are returned as PNG bytes so the caller
decides where they go. numpy and matplotlib are imported inside functions (stage images that
only import the module for its constants must not need them).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

# Published numbers for the CMV pair task (see shared/CMV_DATA.md), shown beside the judge's
# own calibration accuracy so readers know how far to trust the judge.
REFERENCE_ACCURACY = {
    "tan_et_al_2016_interplay_features": 0.65,
    "length_baseline_literature": 0.60,
}
LIKERT = range(1, 8)
Z95 = 1.959963984540054


# ---------------------------------------------------------------- intervals

def bootstrap_mean_ci(values: list[float], *, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; seeded, so a rerun gives the same numbers."""
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


def wilson_ci(successes: float, n: int) -> tuple[float, float] | None:
    """Wilson score interval for a proportion: sane at 0% and 100% and for small n."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rate(count: float, n: int) -> dict[str, Any]:
    return {"rate": (count / n) if n else None, "count": count, "ci95": wilson_ci(count, n)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- sections

def summarize_single(rows: list[dict], criteria: list[str], *, n_boot: int, seed: int) -> dict:
    """Per variant and criterion: mean with bootstrap CI of parsed scores (and of the
    probability-weighted scores where the judge gave log-probabilities), plus a histogram."""
    variants: dict[str, dict] = {}
    for variant in sorted({r["variant"] for r in rows}):
        vrows = [r for r in rows if r["variant"] == variant]
        ok = [r for r in vrows if r["status"] == "ok"]
        per_crit = {}
        for ci, crit in enumerate(criteria):
            scores = [r["scores"][crit] for r in ok if r["scores"].get(crit) is not None]
            weighted = [r["weighted_scores"][crit] for r in ok
                        if (r.get("weighted_scores") or {}).get(crit) is not None]
            per_crit[crit] = {
                "n": len(scores),
                "mean": _mean(scores),
                "ci95": bootstrap_mean_ci(scores, n_boot=n_boot, seed=seed + ci),
                "n_weighted": len(weighted),
                "weighted_mean": _mean(weighted),
                "weighted_ci95": bootstrap_mean_ci(weighted, n_boot=n_boot, seed=seed + ci),
                "histogram": {str(k): sum(1 for s in scores if s == k) for k in LIKERT},
            }
        variants[variant] = {"n": len(vrows), "n_ok": len(ok), "n_failed": len(vrows) - len(ok),
                             "criteria": per_crit}
    return {"criteria": list(criteria), "variants": variants}


def summarize_pairwise(rows: list[dict]) -> dict:
    """Win/tie/loss of side ``a`` per comparison. A pair whose two orders disagree counts as a
    tie (MT-Bench's convention) and is also counted as inconsistent, so it is never hidden."""
    out: dict[str, dict] = {}
    for comp in sorted({r["comparison"] for r in rows}):
        crows = [r for r in rows if r["comparison"] == comp]
        ok = [r for r in crows if r["status"] == "ok"]
        n = len(ok)
        counts = {k: sum(1 for r in ok if r["outcome"] == k) for k in ("win", "tie", "loss")}
        consistent = sum(1 for r in ok if r["consistent"])
        orders = [o for r in ok for o in r["orders"] if o["verdict"] in ("A", "B")]
        out[comp] = {
            "a": crows[0]["a"], "b": crows[0]["b"],
            "n": n, "n_failed": len(crows) - n,
            "win": _rate(counts["win"], n), "tie": _rate(counts["tie"], n),
            "loss": _rate(counts["loss"], n),
            "inconsistent": n - consistent,
            "position_consistency": _rate(consistent, n),
            # Share of decisive single-order verdicts that picked the first-shown reply: 0.5 is unbiased.
            "first_position_preference": _rate(sum(1 for o in orders if o["verdict"] == "A"),
                                               len(orders)),
        }
    return out


def summarize_calibration(rows: list[dict]) -> dict | None:
    """Judge accuracy at telling the delta-winning human reply from its matched loser,
    per presentation order and overall, beside a length baseline on the same pairs."""
    if not rows:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    judged = [o for r in ok for o in r["orders"]]
    by_first = {first: [o for o in judged if o["first"] == first] for first in ("winner", "loser")}
    length_scores = [r["length"]["score"] for r in rows]
    return {
        "n_pairs": len(rows), "n_ok": len(ok), "n_failed": len(rows) - len(ok),
        "accuracy": _rate(sum(1 for o in judged if o["correct"]), len(judged)),
        "accuracy_winner_first": _rate(sum(1 for o in by_first["winner"] if o["correct"]),
                                       len(by_first["winner"])),
        "accuracy_winner_second": _rate(sum(1 for o in by_first["loser"] if o["correct"]),
                                        len(by_first["loser"])),
        "both_orders_correct": _rate(sum(1 for r in ok if all(o["correct"] for o in r["orders"])),
                                     len(ok)),
        "position_consistency": _rate(sum(1 for r in ok if r["consistent"]), len(ok)),
        # Longer reply (in words) wins; equal length counts half. Computed on every sampled pair.
        "length_baseline": _rate(sum(length_scores), len(length_scores)),
        "references": dict(REFERENCE_ACCURACY),
    }


def summarize_failures(rows: list[dict], max_examples: int = 5) -> dict:
    """Count verdicts excluded from the scores, by kind and reason, with a few raw examples."""
    failed_calls = []
    for r in rows:
        calls = r["orders"] if "orders" in r else [r]
        failed_calls += [(r, c) for c in calls if c["status"] != "ok"]
    by_kind: dict[str, int] = {}
    for r, _ in failed_calls:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    return {
        "failed_calls": len(failed_calls),
        "unparseable": sum(1 for _, c in failed_calls if c["status"] == "unparseable"),
        "errors": sum(1 for _, c in failed_calls if c["status"] == "error"),
        "by_kind": by_kind,
        "excluded_judgments": sum(1 for r in rows if r["status"] != "ok"),
        "examples": [{"id": r["id"], "status": c["status"], "error": c.get("error"),
                      "raw": (c.get("raw") or "")[:500]} for r, c in failed_calls[:max_examples]],
    }


def summarize_usage(rows: list[dict]) -> dict:
    """Tokens and cost over every judge call behind these judgments, and the share this run paid."""
    calls = [c for r in rows for c in (r["orders"] if "orders" in r else [r])]
    total = {k: sum(c.get(k) or 0 for c in calls)
             for k in ("attempts", "cached_calls", "new_calls", "prompt_tokens",
                       "completion_tokens", "cost_usd", "cost_usd_this_run")}
    total["cost_usd"] = round(total["cost_usd"], 6)
    total["cost_usd_this_run"] = round(total["cost_usd_this_run"], 6)
    return total


def build_report(rows: list[dict], *, criteria: list[str], meta: dict, n_boot: int = 2000,
                 seed: int = 0) -> dict:
    """The whole report.json object."""
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("single", "pairwise", "calibration")}
    return {
        **meta,
        "single": summarize_single(kinds["single"], criteria, n_boot=n_boot, seed=seed),
        "pairwise": summarize_pairwise(kinds["pairwise"]),
        "calibration": summarize_calibration(kinds["calibration"]),
        "failures": summarize_failures(rows),
        "usage": summarize_usage(rows),
    }


# ---------------------------------------------------------------- markdown

def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(ci: Iterable[float] | None, digits: int = 2) -> str:
    return "n/a" if ci is None else "[" + ", ".join(f"{v:.{digits}f}" for v in ci) + "]"


def _pct(r: dict) -> str:
    if r["rate"] is None:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def render_markdown(report: dict, plots: list[str] = ()) -> str:
    """A readable report.md: what was judged, by whom, how well the judge can be trusted."""
    lines = [
        "# CMV persuasion: judge report", "",
        f"- judge: `{report.get('judge_model')}` via `{report.get('backend')}` backend, "
        f"rubric `{report.get('rubric_version')}`",
        f"- run: `{report.get('run_id')}`; scores are 1-7 Likert; intervals are 95% "
        "(bootstrap for means, Wilson for rates)", "",
    ]
    cal = report.get("calibration")
    lines += ["## How far to trust the judge (calibration on human pairs)", ""]
    if cal:
        lines += [
            "Both replies were written by people in the same thread; one earned the OP's delta. "
            "The judge saw each pair in both orders.", "",
            "| measure | value |", "| --- | --- |",
            f"| judge accuracy (all orders) | {_pct(cal['accuracy'])} |",
            f"| accuracy, winner shown first | {_pct(cal['accuracy_winner_first'])} |",
            f"| accuracy, winner shown second | {_pct(cal['accuracy_winner_second'])} |",
            f"| correct in both orders | {_pct(cal['both_orders_correct'])} |",
            f"| position consistency | {_pct(cal['position_consistency'])} |",
            f"| length baseline on these pairs (longer wins) | {_pct(cal['length_baseline'])} |",
            f"| Tan et al. 2016 (interplay features, reference) | "
            f"{100 * cal['references']['tan_et_al_2016_interplay_features']:.0f}% |",
            f"| length baseline (literature, reference) | "
            f"{100 * cal['references']['length_baseline_literature']:.0f}% |",
            f"| pairs judged / failed | {cal['n_ok']} / {cal['n_failed']} |", "",
        ]
        if cal["accuracy"]["rate"] is not None and cal["length_baseline"]["rate"] is not None \
                and cal["accuracy"]["rate"] <= cal["length_baseline"]["rate"]:
            lines += ["**The judge does not beat the length baseline on these pairs: read its "
                      "persuasiveness verdicts with caution.**", ""]
    else:
        lines += ["Not run.", ""]

    single = report["single"]
    lines += ["## Single-answer grades (mean, 95% CI)", ""]
    if single["variants"]:
        crits = single["criteria"]
        lines += ["| variant | n ok / failed | " + " | ".join(crits) + " |",
                  "| --- | --- |" + " --- |" * len(crits)]
        for variant, v in single["variants"].items():
            cells = [f"{_f(c['mean'])} {_ci(c['ci95'])}" for c in v["criteria"].values()]
            lines.append(f"| {variant} | {v['n_ok']} / {v['n_failed']} | " + " | ".join(cells) + " |")
        weighted = any(c["n_weighted"] for v in single["variants"].values()
                       for c in v["criteria"].values())
        if weighted:
            lines += ["", "Probability-weighted scores (sum of p(k)·k over the judge's score-token "
                      "probabilities; steadier than the parsed digit):", "",
                      "| variant | " + " | ".join(crits) + " |", "| --- |" + " --- |" * len(crits)]
            for variant, v in single["variants"].items():
                cells = [f"{_f(c['weighted_mean'])} {_ci(c['weighted_ci95'])}"
                         for c in v["criteria"].values()]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["Not run.", ""]

    lines += ["## Pairwise (each pair judged in both orders; disagreement counts as a tie)", ""]
    if report["pairwise"]:
        lines += ["| comparison | n | win | tie | loss | inconsistent | position consistency | "
                  "first-position preference | failed |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for comp, p in report["pairwise"].items():
            lines.append(f"| {p['a']} vs {p['b']} | {p['n']} | {_pct(p['win'])} | {_pct(p['tie'])} | "
                         f"{_pct(p['loss'])} | {p['inconsistent']} | {_pct(p['position_consistency'])} | "
                         f"{_pct(p['first_position_preference'])} | {p['n_failed']} |")
        lines.append("")
    else:
        lines += ["Not run.", ""]

    fail = report["failures"]
    lines += ["## Failures (excluded from every score, never scored as a number)", "",
              f"- judge calls that failed: {fail['failed_calls']} "
              f"(unparseable after retries: {fail['unparseable']}, transport errors: {fail['errors']})",
              f"- judgments excluded: {fail['excluded_judgments']}"]
    for ex in fail["examples"]:
        lines.append(f"  - `{ex['id']}` {ex['status']}: {ex['error']}; raw: `{ex['raw'][:120]!r}`")
    usage = report["usage"]
    lines += ["", "## Usage", "",
              f"- judge calls: {usage['attempts']} ({usage['cached_calls']} from cache, "
              f"{usage['new_calls']} new this run)",
              f"- tokens: {usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion"]
    if report.get("backend") == "openai" and "prices_usd_per_mtok" in report \
            and not report.get("prices_usd_per_mtok"):
        # An endpoint model with no price: $0 would read as "free"; say that it was not priced.
        lines += [f"- cost: not computed, no price for `{report.get('judge_model')}` (set judge.prices)", ""]
    else:
        lines += [f"- cost: ${usage['cost_usd']:.4f} in all, ${usage['cost_usd_this_run']:.4f} this run", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render_plots(report: dict) -> dict[str, bytes]:
    """PNG bytes by file name: score histograms per criterion, and pairwise outcome bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    single = report["single"]
    if single["variants"]:
        crits = single["criteria"]
        fig, axes = plt.subplots(1, len(crits), figsize=(4 * len(crits), 3.2), squeeze=False)
        variants = list(single["variants"])
        width = 0.8 / len(variants)
        for ax, crit in zip(axes[0], crits):
            for i, variant in enumerate(variants):
                hist = single["variants"][variant]["criteria"][crit]["histogram"]
                xs = [k + (i - (len(variants) - 1) / 2) * width for k in LIKERT]
                ax.bar(xs, [hist[str(k)] for k in LIKERT], width=width, label=variant)
            ax.set_title(crit)
            ax.set_xticks(list(LIKERT))
            ax.set_xlabel("score")
        axes[0][0].set_ylabel("replies")
        axes[0][-1].legend(fontsize="small")
        fig.tight_layout()
        plots["scores_histogram.png"] = _png(fig)
    if report["pairwise"]:
        comps = list(report["pairwise"].values())
        fig, ax = plt.subplots(figsize=(6, 1 + 0.6 * len(comps)))
        left = [0.0] * len(comps)
        labels = [f"{p['a']} vs {p['b']}" for p in comps]
        for key, colour in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            vals = [p[key]["rate"] or 0.0 for p in comps]
            ax.barh(labels, vals, left=left, color=colour, label=key)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of pairs")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        plots["pairwise.png"] = _png(fig)
    return plots
