"""report.md from the report.json object: one function per section, in the order the reader meets them."""

from __future__ import annotations

from cmv_core.report.intervals import ALPHA
from cmv_core.report.text import fmt_ci, fmt_num, fmt_p, fmt_pct, fmt_vs_length, time_split_reading


def render_markdown(report: dict, plots: list[str] = ()) -> str:
    """A readable report.md: what was judged, by whom, how well the judge can be trusted."""
    lines = ["# CMV persuasion: judge report", ""]
    lines += _summary_lines(report)
    lines += _calibration_section(report)
    lines += _single_section(report)
    lines += _instruments_section(report)
    lines += _pair_files_section(report)
    lines += _differences_section(report)
    lines += _pairwise_section(report)
    lines += _length_control_section(report)
    lines += _scale_section(report)
    lines += _truncation_lines(report)
    lines += _failures_section(report)
    lines += _usage_section(report)
    lines += _plots_section(plots)
    return "\n".join(lines)


def _headline_cell(x: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """An estimate with its interval and threads, or a dash where the run has none."""
    if not x or x.get("estimate") is None:
        return "-"
    ci = x.get("ci95")
    ci_txt = fmt_ci(None if ci is None else [scale * v for v in ci], digits)
    return f"{fmt_num(scale * x['estimate'], digits)} {ci_txt} ({x.get('n_threads')} threads)"


def _headline_lines(report: dict) -> list[str]:
    """Table 1: per variant, the percentile of its reply among the thread's human replies, P(preferred
    over base) and the Bradley-Terry strength, each with a 95% interval and its threads; one sentence."""
    head = report.get("headline") or {}
    if not head.get("rows"):
        return []
    pct = report.get("percentile") or {}
    lines = [
        f"**Table 1.** Percentile vs humans: the reply's rank among its thread's human replies graded by the "
        f"same judge on {pct.get('criterion', 'persuasiveness')} (0-100, ties half; the delta winners' row ranks "
        "each winner among the other humans); win rate: P(preferred over base) in the pairwise judgments; "
        "strength: Bradley-Terry, base = 0. Intervals 95% over threads.",
        "",
        "| variant | percentile vs humans | win rate vs base | Bradley-Terry strength |",
        "| --- | --- | --- | --- |",
    ]
    for row in head["rows"]:
        lines.append(
            f"| {row['variant']} | {_headline_cell(row['percentile'], digits=1)} | "
            f"{_headline_cell(row['win_vs_base'])} | {_headline_cell(row['strength'])} |"
        )
    lines += ["", head["sentence"]]
    gap = pct.get("gap_closed") or {}
    for v, g in gap.items():
        lines.append(
            f"- {v}: share of the base-to-delta-winner percentile gap closed {fmt_num(g['estimate'])} "
            f"{'[unbounded: the gap is not told from zero]' if g['ci95'] is None else fmt_ci(g['ci95'])} "
            f"({g['n_threads']} threads)"
        )
    if pct.get("n_human_replies"):
        lines.append(
            f"- human replies graded: {pct['n_human_replies']} ({pct['n_human_failed']} failed, left out) in "
            f"{pct['n_threads_with_humans']} threads: the delta winners and matched losers of the format "
            "stage's pairs.jsonl, the only human replies it writes"
        )
    return lines + [""]


def _summary_lines(report: dict) -> list[str]:
    """The conclusion, then who judged what and how the intervals were made."""
    lines = [f"- {c}" for c in report.get("conclusion") or []] + [""]
    lines += _headline_lines(report)
    lines += [
        f"- judge: `{report.get('judge_model')}` via `{report.get('backend')}` backend, "
        f"rubric `{report.get('rubric_version')}`",
        f"- run: `{report.get('run_id')}`; scores are 1-7 Likert; intervals are 95%: means and "
        "preferences are t intervals on thread means (a thread's examples share a prompt; they hold at 10 "
        "threads), per-order rates are Wilson; p-values are t tests over threads or exact paired (McNemar) tests",
    ]
    if report.get("human_reference"):
        lines.append(f"- human reference: {report['human_reference']}")
    prov = report.get("provenance") or {}
    if prov.get("models"):
        lines.append(
            "- judge provenance (as returned): model "
            + ", ".join(f"`{m}`" for m in prov.get("models") or [])
            + "; system_fingerprint "
            + (", ".join(f"`{f}`" for f in prov.get("system_fingerprints") or []) or "none")
            + f"; seed {prov.get('seed')}"
        )
    server = report.get("judge_server") or {}
    if server.get("version") or server.get("models"):
        lines.append(
            f"- judge server: {server.get('server') or 'unknown'} {server.get('version') or '(version not reported)'}"
            f" at `{server.get('base_url')}`, serving "
            + (", ".join(f"`{m['id']}`" for m in server.get("models") or []) or "(no model list)")
            + "".join(f"; rejected `{k}`, sent {v}" for k, v in (server.get("adapted") or {}).items())
        )
    lines.append("")
    return lines


def _calibration_section(report: dict) -> list[str]:
    cal = report.get("calibration")
    lines = ["## How far to trust the judge (calibration on human pairs)", ""]
    if not cal:
        return lines + ["Not run.", ""]
    lines += [
        "Both replies were written by people in the same thread; one earned the OP's delta. "
        "The judge saw each pair in both orders.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| judge accuracy (all orders) | {fmt_pct(cal['accuracy'])} |",
        f"| accuracy, winner shown first | {fmt_pct(cal['accuracy_winner_first'])} |",
        f"| accuracy, winner shown second | {fmt_pct(cal['accuracy_winner_second'])} |",
        f"| correct in both orders | {fmt_pct(cal['both_orders_correct'])} |",
        f"| position consistency | {fmt_pct(cal['position_consistency'])} |",
        f"| length baseline on these pairs (longer wins) | {fmt_pct(cal['length_baseline'])} |",
        f"| judge vs length, exact paired test on the same pairs | {fmt_vs_length(cal['vs_length'])} |",
        f"| Brier score of P(winner), both orders averaged | {fmt_num(cal['brier'], 3)} |",
        f"| Tan et al. 2016 (interplay features, reference) | "
        f"{100 * cal['references']['tan_et_al_2016_interplay_features']:.0f}% |",
        f"| length baseline (literature, reference) | {100 * cal['references']['length_baseline_literature']:.0f}% |",
        f"| pairs judged / failed | {cal['n_ok']} / {cal['n_failed']} |",
        "",
    ]
    vs = cal["vs_length"]
    if vs and not (vs["p_value"] < ALPHA and vs["difference"] > 0):
        lines += [
            "**The judge is not shown to beat the length baseline on these pairs (paired test "
            f"p = {fmt_p(vs['p_value'])}): read its persuasiveness verdicts with caution.**",
            "",
        ]
    return lines


def _single_section(report: dict) -> list[str]:
    single = report["single"]
    lines = ["## Single-answer grades (mean, 95% CI)", ""]
    if not single["variants"]:
        return lines + ["Not run.", ""]
    crits = single["criteria"]
    lines += ["| variant | n ok / failed | " + " | ".join(crits) + " |", "| --- | --- |" + " --- |" * len(crits)]
    for variant, v in single["variants"].items():
        cells = [f"{fmt_num(c['mean'])} {fmt_ci(c['ci95'])}" for c in v["criteria"].values()]
        lines.append(f"| {variant} | {v['n_ok']} / {v['n_failed']} | " + " | ".join(cells) + " |")
    weighted = any(c["n_weighted"] for v in single["variants"].values() for c in v["criteria"].values())
    if weighted:
        lines += [
            "",
            "Probability-weighted scores (sum of p(k)·k over the judge's score-token "
            "probabilities; steadier than the parsed digit):",
            "",
            "| variant | " + " | ".join(crits) + " |",
            "| --- |" + " --- |" * len(crits),
        ]
        for variant, v in single["variants"].items():
            cells = [f"{fmt_num(c['weighted_mean'])} {fmt_ci(c['weighted_ci95'])}" for c in v["criteria"].values()]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _instruments_section(report: dict) -> list[str]:
    inst = report.get("instruments") or {}
    if not inst:
        return []
    lines = [
        "## Every instrument on real delta pairs",
        "",
        "Each instrument judged the delta winner and its matched loser (pair = unit, both orders "
        "averaged, tie = 1/2). The length model is a logistic model on tanh(word difference / sd), "
        "cross-validated by thread on the same pairs.",
        "",
        "| instrument | pairs | accuracy | Brier | length CV accuracy | gain over length CV (p) | "
        "AUC of score difference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, b in inst.items():
        gain = b["vs_length_cv"]
        gain_txt = (
            "n/a"
            if not gain
            else f"{gain['difference']:+.2f} {fmt_ci(gain['difference_ci95'])} (p = {fmt_p(gain['p_value'])})"
        )
        aucs = b.get("auc_weighted") or {}
        auc_txt = ", ".join(f"{c} {fmt_num(v)}" for c, v in aucs.items()) if aucs else "-"
        lines.append(
            f"| {name} | {b['n_pairs']} ({b['n_failed']} failed) | {fmt_num(b['accuracy'])} "
            f"{fmt_ci(b['accuracy_ci95'])} | {fmt_num(b['brier'], 3)} | {fmt_num(b['length_cv_accuracy'])} | "
            f"{gain_txt} | {auc_txt} |"
        )
    lines.append("")
    splits = {n: b["time_split"] for n, b in inst.items() if "time_split" in b}
    if splits:
        lines += _time_split_table(splits)
    return lines


def _pair_files_section(report: dict) -> list[str]:
    """Every instrument on each published pair set (judge.pair_files), beside the published accuracies."""
    lines = []
    for source, s in (report.get("pair_files") or {}).items():
        refs = ", ".join(f"{k} {v:.2f}" for k, v in s["references"].items())
        skipped = ", ".join(f"{k} {n}" for k, n in sorted(s["skipped"].items())) or "none"
        lines += [
            f"## Every instrument on {source} ({s['format']})",
            "",
            f"- pairs judged: {s['n_judged']}; skipped: {sum(s['skipped'].values())} ({skipped})",
            f"- published accuracies: {refs}; intervals resample original posts",
            "",
            "| instrument | pairs (failed) | posts | accuracy | AUC | vs length on the same pairs |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, b in s["instruments"].items():
            lines.append(
                f"| {name} | {b['n_pairs']} ({b.get('n_failed', 0)}) | {b['n_threads']} | {fmt_num(b['accuracy'])} "
                f"{fmt_ci(b['accuracy_ci95'])} | {fmt_num(b['auc'])} | {fmt_vs_length(b.get('vs_length'))} |"
            )
        lines.append("")
    return lines


def _time_split_table(splits: dict[str, dict]) -> list[str]:
    """The instruments' accuracy before and after the time split's date, per instrument."""
    date = next(iter(splits.values()))["split_date"][:10]
    lines = [
        f"### Time split: threads before and after {date}",
        "",
        "The same instruments on delta pairs of threads created before the date (with the format "
        "stage's time split: its train-period threads, which the judge may have read in "
        "pretraining) and on or after it (the test threads). Accuracy per group is thread-weighted "
        "(tie = 1/2) with a thread-cluster interval; the difference has a bootstrap interval and "
        "a two-sample permutation test over threads. The rows above use the test pairs only.",
        "",
        "| instrument | before: pairs (threads) | before: accuracy | after: pairs (threads) | "
        "after: accuracy | before - after (p) | reading |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, t in splits.items():
        b, a, d = t["before"], t["after"], t["difference"]
        diff = (
            "n/a" if d["estimate"] is None else f"{d['estimate']:+.2f} {fmt_ci(d['ci95'])} (p = {fmt_p(d['p_value'])})"
        )
        lines.append(
            f"| {n} | {b['n_pairs']} ({b['n_threads']}) | {fmt_num(b['accuracy'])} "
            f"{fmt_ci(b['accuracy_ci95'])} | {a['n_pairs']} ({a['n_threads']}) | {fmt_num(a['accuracy'])} "
            f"{fmt_ci(a['accuracy_ci95'])} "
            f"| {diff} | {time_split_reading(t)} |"
        )
    lines.append("")
    return lines


def _differences_section(report: dict) -> list[str]:
    diffs = report.get("single_differences") or {}
    if not diffs:
        return []
    lines = [
        "## Paired score differences (a - b on the same prompts; per-thread means)",
        "",
        "| comparison | criterion | difference | p | threads | excluded |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in diffs.values():
        for crit, v in d["criteria"].items():
            lines.append(
                f"| {d['a']} - {d['b']} | {crit} | {fmt_num(v['estimate'])} {fmt_ci(v['ci95'])} | "
                f"{fmt_p(v['p_value'])} | {v['n_threads']} | {v['n_excluded']} |"
            )
    lines.append("")
    return lines


def _pairwise_section(report: dict) -> list[str]:
    lines = ["## Pairwise (each pair judged in both orders; disagreement counts as a tie)", ""]
    if not report["pairwise"]:
        return lines + ["Not run.", ""]
    lines += [
        "| comparison | n | win | tie | loss | inconsistent | position consistency | "
        "first-position preference | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in report["pairwise"].values():
        lines.append(
            f"| {p['a']} vs {p['b']} | {p['n']} | {fmt_pct(p['win'])} | {fmt_pct(p['tie'])} | "
            f"{fmt_pct(p['loss'])} | {p['inconsistent']} | {fmt_pct(p['position_consistency'])} | "
            f"{fmt_pct(p['first_position_preference'])} | {p['n_failed']} |"
        )
    lines += [
        "",
        "| comparison | P(a preferred) = win + tie/2 | p (vs 1/2) | at equal length and style | threads |",
        "| --- | --- | --- | --- | --- |",
    ]
    by_group = ((report.get("length_control") or {}).get("model") or {}).get("by_group") or {}
    for comp, p in report["pairwise"].items():
        pr, g = p["preference"], by_group.get(comp)
        lc_txt = f"{g['estimate']:.2f} {fmt_ci(g['ci95'])}" if g else "n/a"
        lines.append(
            f"| {p['a']} vs {p['b']} | {fmt_num(pr['estimate'])} {fmt_ci(pr['ci95'])} | "
            f"{fmt_p(pr['p_value'])} | {lc_txt} | {pr['n_threads']} |"
        )
    lines.append("")
    return lines


def _length_control_section(report: dict) -> list[str]:
    lc = report.get("length_control") or {}
    if not (lc.get("model") or {}).get("coef"):
        return []
    m = lc["model"]
    lines = [
        "## Length and style control",
        "",
        "A logistic model of each pairwise verdict (per order) with an intercept per comparison and "
        "shared terms for tanh(word difference / sd), the reply shown first, truncated replies and "
        'meta preambles ("Here\'s a revised version..."); standard errors clustered by thread. '
        "The preference at equal length is the intercept's.",
        "",
        "- coefficients: "
        + ", ".join(f"{k} {v:+.2f} (SE {m['coef_se'][k]:.2f})" for k, v in m["coef"].items())
        + (f"; not estimable here (constant): {', '.join(m['dropped'])}" if m["dropped"] else ""),
    ]
    probe = lc.get("probe_prefer_longer")
    if probe and probe["estimate"] is not None:
        lines.append(
            f"- length probe (the same reply in full vs trimmed): P(prefer longer | same content) "
            f"{probe['estimate']:.2f} {fmt_ci(probe['ci95'])}, {probe['n_threads']} threads"
        )
    lines.append("")
    return lines


def _scale_section(report: dict) -> list[str]:
    scale = report.get("scale") or {}
    if not scale.get("strengths"):
        return []
    lines = [
        "## A scale anchored on people (Bradley-Terry over every pairwise verdict)",
        "",
        f"Strengths on the logit scale, `{scale['base']}` = 0; share of gap closed = "
        f"(model - {scale['base']}) / ({scale['reference']} - {scale['base']}).",
        "",
        "| variant | strength |",
        "| --- | --- |",
    ]
    for v, st in sorted(scale["strengths"].items(), key=lambda kv: kv[1]):
        lines.append(f"| {v} | {st:+.2f} {fmt_ci(scale['strengths_ci95'].get(v))} |")
    for m, g in scale["models"].items():
        lines.append("")
        lines.append(
            f"- {m}: share of the gap to `{scale['reference']}` closed "
            f"{fmt_num(g['gap_closed'])} {fmt_ci(g['gap_closed_ci95'])}"
        )
    lines.append("")
    return lines


def _truncation_lines(report: dict) -> list[str]:
    trunc = report.get("truncated_generations") or {}
    if not trunc:
        return []
    return [
        "- generated replies cut by the token limit (finish_reason length): "
        + ", ".join(f"{v} {n}" for v, n in trunc.items()),
        "",
    ]


def _failures_section(report: dict) -> list[str]:
    fail = report["failures"]
    lines = [
        "## Failures (excluded from every score, never scored as a number)",
        "",
        f"- judge calls that failed: {fail['failed_calls']} "
        f"(unparseable after retries: {fail['unparseable']}, refusals: {fail.get('refusals', 0)}, "
        f"transport errors: {fail['errors']})",
        f"- judgments excluded: {fail['excluded_judgments']}",
    ]
    for ex in fail["examples"]:
        lines.append(f"  - `{ex['id']}` {ex['status']}: {ex['error']}; raw: `{ex['raw'][:120]!r}`")
    return lines


def _usage_section(report: dict) -> list[str]:
    usage = report["usage"]
    timing = ""
    if report.get("judge_seconds") is not None:
        timing = f"- time: judging {report['judge_seconds']:.0f} s (up to the report)" + (
            f", training {report['train_seconds']:.0f} s" if report.get("train_seconds") else ""
        )
    lines = (
        ["", "## Usage", ""]
        + ([timing] if timing else [])
        + [
            f"- judge calls: {usage['attempts']} ({usage['cached_calls']} from cache, "
            f"{usage['new_calls']} new this run)",
            f"- tokens: {usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion",
        ]
    )
    if (
        report.get("backend") in ("openai", "openai-batch")
        and "prices_usd_per_mtok" in report
        and not report.get("prices_usd_per_mtok")
    ):
        # An endpoint model with no price: $0 would read as "free"; say that it was not priced.
        return lines + [f"- cost: not computed, no price for `{report.get('judge_model')}` (set judge.prices)", ""]
    return lines + [f"- cost: ${usage['cost_usd']:.4f} in all, ${usage['cost_usd_this_run']:.4f} this run", ""]


def _plots_section(plots: list[str]) -> list[str]:
    if not plots:
        return []
    return ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
