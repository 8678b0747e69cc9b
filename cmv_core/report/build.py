"""Summarise judge verdicts: judgment rows to the report.json object (pure, no storage, no judge).

Input rows are the lines of ``judgments.jsonl`` written by the judge stage. Nothing here calls a
judge or touches storage: the judge stage writes report.json, and renders report.md
(``cmv_core.report.markdown``) and the plots (``cmv_core.report.plots``) from it. The statistics
are in ``cmv_core.stats``: the unit of resampling is the thread (examples of one thread share a
prompt), comparisons are paired on the same items, and ``conclusion_lines`` states in words what
the numbers support, or that they cannot tell. numpy and matplotlib are imported inside functions
(stage images that only import the module for its constants must not need them).
"""

from __future__ import annotations

from cmv_core.report.accounting import summarize_failures, summarize_truncation, summarize_usage
from cmv_core.report.calibration import summarize_calibration, summarize_instruments, summarize_pair_files
from cmv_core.report.conclusion import conclusion_lines
from cmv_core.report.percentile import headline_criterion, headline_rows, headline_sentence, summarize_percentile
from cmv_core.report.units import is_headline
from cmv_core.report.variants import (
    summarize_length_control,
    summarize_pairwise,
    summarize_scale,
    summarize_single,
    summarize_single_differences,
)


def build_report(rows: list[dict], *, criteria: list[str], meta: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """The whole report.json object."""
    kinds = {
        k: [r for r in rows if r["kind"] == k]
        for k in ("single", "pairwise", "calibration", "validation", "length_probe", "human_reply")
    }
    comparisons = [tuple(c) for c in meta.get("comparisons") or sorted({(r["a"], r["b"]) for r in kinds["pairwise"]})]
    report = {
        **meta,
        "single": summarize_single(kinds["single"], criteria, n_boot=n_boot, seed=seed),
        "single_differences": summarize_single_differences(
            kinds["single"], criteria, comparisons, n_boot=n_boot, seed=seed
        ),
        "pairwise": summarize_pairwise(kinds["pairwise"], n_boot=n_boot, seed=seed),
        "calibration": summarize_calibration(
            [r for r in kinds["calibration"] if is_headline(r)], n_boot=n_boot, seed=seed
        ),
        "instruments": summarize_instruments(
            kinds["calibration"],
            kinds["validation"],
            criteria,
            n_boot=n_boot,
            seed=seed,
            split_utc=meta.get("time_split_utc"),
        ),
        "length_control": summarize_length_control(kinds["pairwise"], kinds["length_probe"], n_boot=n_boot, seed=seed),
        "scale": summarize_scale(
            kinds["pairwise"],
            base=meta.get("base_variant", "base"),
            reference=meta.get("human_variant", "human"),
            n_boot=n_boot,
            seed=seed,
        ),
        "percentile": summarize_percentile(
            kinds["single"],
            kinds["human_reply"],
            headline_criterion(criteria),
            base=meta.get("base_variant", "base"),
            n_boot=n_boot,
            seed=seed,
        ),
        "truncated_generations": summarize_truncation(rows),
        "failures": summarize_failures(rows),
        "usage": summarize_usage(rows),
    }
    report["headline"] = {"rows": headline_rows(report), "sentence": headline_sentence(report)}
    if meta.get("pair_files"):
        report["pair_files"] = summarize_pair_files(
            kinds["calibration"], kinds["validation"], meta["pair_files"], criteria, n_boot=n_boot, seed=seed
        )
    report["conclusion"] = conclusion_lines(report, criteria)
    return report
