"""Number formats shared by the conclusion and report.md, and the time split's reading in words."""

from __future__ import annotations

from collections.abc import Iterable


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_ci(ci: Iterable[float] | None, digits: int = 2) -> str:
    return "n/a" if ci is None else "[" + ", ".join(f"{v:.{digits}f}" for v in ci) + "]"


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}")


def fmt_vs_length(v: dict | None) -> str:
    if not v:
        return "n/a"
    return (
        f"difference {v['difference']:+.2f} {fmt_ci(v['difference_ci95'])}, discordant pairs "
        f"{v['discordant_first_better']} judge / {v['discordant_second_better']} length, p = {fmt_p(v['p_value'])}"
    )


def fmt_pct(r: dict) -> str:
    if r["rate"] is None:
        return "n/a"
    if r["ci95"] is None:  # a thread-clustered rate from one thread has no interval
        return f"{100 * r['rate']:.1f}% [n/a]"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def time_split_reading(t: dict) -> str:
    """The time-split comparison of one instrument in words."""
    b, a = t["before"], t["after"]
    if t["reading"] == "too_few":
        return (
            f"too few pairs to tell (threads: {b['n_threads']} before, {a['n_threads']} after; at least "
            f"{t['min_threads']} in each needed)"
        )
    if t["reading"] == "no_difference":
        return "no difference shown"
    if t["reading"] == "better_before":
        return "better before the date: consistent with the judge having read those threads in pretraining"
    return "better after the date"
