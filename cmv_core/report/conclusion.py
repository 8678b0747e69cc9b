"""The report's conclusion: what the numbers support, in words, or that they cannot tell."""

from __future__ import annotations

from cmv_core.report.intervals import ALPHA, MIN_THREADS, resolution
from cmv_core.report.text import fmt_ci, fmt_p, time_split_reading


def _judge_line(report: dict) -> tuple[str | None, bool | None]:
    """'judge agreement with real deltas 58% [52, 64] vs length 55% (p = 0.03)' and whether the
    judge beats the length baseline on the same pairs (None: no calibration)."""
    cal = report.get("calibration")
    if not cal or not cal["vs_length"] or cal["accuracy"]["rate"] is None:
        return None, None
    vs = cal["vs_length"]
    ci = cal["accuracy"]["ci95"]  # None with one thread: no spread to measure
    ci_text = "[n/a]" if ci is None else f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
    beats = vs["p_value"] < ALPHA and vs["difference"] > 0
    text = (
        f"judge agreement with real deltas {100 * cal['accuracy']['rate']:.0f}% {ci_text} vs length "
        f"{100 * vs['second']:.0f}% on the same {vs['n']} pairs "
        f"(exact paired test p = {fmt_p(vs['p_value'])})"
    )
    return text, beats


def conclusion_lines(report: dict, criteria: list[str]) -> list[str]:
    """What the numbers support, in words, one line per comparison, then what limits them."""
    crit = criteria[0] if criteria else None
    # in the order the comparisons were asked for (the first is the headline), then any others
    asked = [f"{a}_vs_{b}" for a, b in report.get("comparisons") or []]
    order = [c for c in asked if c in report["pairwise"]] + [c for c in report["pairwise"] if c not in asked]
    lines = [_comparison_line(report, comp, crit) for comp in order]
    judge_text, beats = _judge_line(report)
    if judge_text:
        tail = (
            ""
            if beats
            else (
                " The judge has not been shown to know more than reply length about which "
                "reply earns a delta: read its verdicts as length-driven until it does."
            )
        )
        lines.append(judge_text[0].upper() + judge_text[1:] + "." + tail)
    elif report["pairwise"]:
        lines.append("The judge was not validated on real delta pairs (no calibration): its verdicts are unvalidated.")
    split = ((report.get("instruments") or {}).get("forced_choice") or {}).get("time_split")
    if split:  # beside the headline (test pairs), not instead of it
        lines.append(_time_split_line(split))
    if not lines:
        lines.append("Nothing was compared: the data cannot tell anything yet.")
    return lines


def _comparison_line(report: dict, comp: str, crit: str | None) -> str:
    """One comparison's numbers (score difference, preference, at equal length, threads) and its verdict."""
    lc = (report.get("length_control") or {}).get("model") or {}
    p = report["pairwise"][comp]
    a, b = p["a"], p["b"]
    pref = p["preference"]
    n_threads = pref["n_threads"]
    parts = []
    diff = (report["single_differences"].get(comp) or {}).get("criteria", {}).get(crit) if crit else None
    if diff and diff["estimate"] is not None:
        parts.append(f"{diff['estimate']:+.2f} {crit} {fmt_ci(diff['ci95'])} (p = {fmt_p(diff['p_value'])})")
    if pref["estimate"] is not None:
        parts.append(f"P({a} preferred) {pref['estimate']:.2f} {fmt_ci(pref['ci95'])} (p = {fmt_p(pref['p_value'])})")
    g = (lc.get("by_group") or {}).get(comp)
    if g:
        parts.append(f"at equal length {g['estimate']:.2f} {fmt_ci(g['ci95'])}")
    parts.append(f"{n_threads} thread{'s' if n_threads != 1 else ''}")
    line = f"**{a} vs {b}**: " + ", ".join(parts)
    if n_threads < MIN_THREADS:
        verdict = f"{n_threads} thread(s) are too few to tell {a} from {b} (at least {MIN_THREADS} needed)."
    elif not (res := resolution(pref["estimate"], pref["ci95"], null=0.5, n_threads=n_threads)) or not res["tells"]:
        verdict = f"the data cannot tell {a} from {b} apart{_too_small(res, n_threads)}."
    else:
        better = a if pref["estimate"] > 0.5 else b
        worse = b if better == a else a
        verdict = f"the judge prefers {better} over {worse}"
        if g and g["ci95"][0] <= 0.5 <= g["ci95"][1]:
            verdict += ", but not at equal length: the preference is explained by reply length"
        verdict += "."
    if g and g.get("one_sided_length"):
        verdict += (
            f" ({a}'s replies are always on one side in length here, so the equal-length value "
            "rests on the length effect measured in the other comparisons.)"
        )
    return f"{line}. Conclusion: {verdict}"


def _too_small(res: dict | None, n_threads: int) -> str:
    """Why the data cannot tell, from the preference's interval (README "Reading the report"): it
    contains 1/2, so its half-width is at least the effect seen."""
    if not res:
        return ""
    if res["threads_needed"] is None:
        return f" (no preference seen; the interval reaches {res['half_width']:.2f} either side of 1/2)"
    return (
        f": {n_threads} threads are too few to tell a preference of {0.5 + res['effect']:.2f} from 1/2 (the "
        f"interval reaches {res['half_width']:.2f} either side, more than the {abs(res['effect']):.2f} seen; "
        f"about {res['threads_needed']} threads would be needed)"
    )


def _time_split_line(split: dict) -> str:
    """The forced-choice accuracy before and after the time split's date, and its reading."""
    b, a, d = split["before"], split["after"], split["difference"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    nums = f"{pct(b['accuracy'])} on {b['n_pairs']} pairs before vs {pct(a['accuracy'])} on {a['n_pairs']} after" + (
        ""
        if d["estimate"] is None
        else f", difference {d['estimate']:+.2f} {fmt_ci(d['ci95'])} (permutation p = {fmt_p(d['p_value'])})"
    )
    return (
        f"Time split at {split['split_date'][:10]}: judge agreement with real deltas {nums}: "
        f"{time_split_reading(split)}."
    )
