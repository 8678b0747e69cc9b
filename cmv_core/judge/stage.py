"""The judge stage: score generated replies with an LLM judge and write the report.

Kinds of judgment, all from one rubric version:

- single: each reply (every generated variant, and the human references) graded 1-7 on each
  criterion of ``CRITERIA`` with a short rationale;
- pairwise: each ``comparisons`` pair (default: finetuned vs base, each model vs the human delta
  winner, each model vs the matched non-delta reply of an ordinary commenter), each judged in
  both orders; when the orders disagree the pair is a tie and is counted as inconsistent;
- calibration: on the format stage's ``pairs.jsonl`` the judge picks which of two human
  replies won the delta (both orders), reported beside a length baseline on the same pairs;
- validation (``validate_instruments``, on by default): the pairwise prompt and the rubric that
  produce the headline numbers are run on the same delta pairs, so that every instrument is
  scored against real outcomes;
- time split: when the format stage split by time it also wrote ``pairs_before.jsonl``, the
  delta pairs of its train-period threads (before ``test_after``). Every instrument above judges
  a sample of them too (``max_before_pairs``), and the report compares its accuracy on them with
  its accuracy on the test pairs (after the date): a judge that read the earlier threads in
  pretraining may do better on them. The headline calibration stays on the test pairs. (Judging
  the judge on threads the fine-tuned model trained on is legitimate: the judge is another model.)
- length probe (``length_probe_items``): a model's reply against its own trimmed version, for
  P(prefer longer | same content).

Human references are fair by default (``human_reference: depth1``): only delta winners that
reply to the post itself, so that the judge sees everything the human reply answered.

Backends: any OpenAI-compatible chat endpoint (``openai.AsyncOpenAI``: its own retries with
backoff on 429/5xx/timeouts, bounded concurrency here), OpenAI's Batch API
(``backend: openai-batch``, half price; a killed stage resumes by polling its batch), and a
local in-process model that fills the verdict JSON itself and reads the score digit from
next-token probabilities. Every judge call goes through a persistent cache under the output
(keyed by endpoint, model, prompt, parameters and rubric), so a rerun or a resumed run repeats
no call. A verdict that cannot be parsed is asked again, then recorded as a failure and
excluded from every score; a refusal is recorded as a refusal. ``cmv judge --dry-run`` prints
the plan (calls, estimated tokens and cost) and sends nothing; ``max_cost_usd`` stops the stage
before it would spend more. The returned model snapshot, system fingerprint and seed are kept
per call and summarised in the report.

The package, bottom-up: ``config`` (JudgeConfig, constants, errors), ``prompts``, ``parse``,
``cache``, ``calls`` (one call through the cache, many at once), ``backends`` (``openai``,
``batch``, ``local``), ``inputs``, ``rows`` (judgment rows), ``plan`` (the calls, their cost, the
backend), and this module, the stage's entry (run_judge, the CLI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

from cmv_core import errors, storage
from cmv_core.judge.cache import ResponseCache
from cmv_core.judge.calls import run_calls
from cmv_core.judge.config import (
    CRITERIA,
    HUMAN,
    RUBRIC_VERSION,
    JudgeBudgetError,
    JudgeConfig,
    JudgeFailed,
    price_name,
)
from cmv_core.judge.inputs import load_inputs, pair_files_summary, time_split_utc
from cmv_core.judge.plan import estimate_cost, make_backend, plan_calls, planned_params
from cmv_core.judge.rows import assemble_rows

log = logging.getLogger(__name__)


def _validate(cfg: JudgeConfig) -> None:
    unknown = [c for c in cfg.criteria if c not in CRITERIA]
    if unknown or not cfg.criteria:
        raise errors.InputError(f"judge.criteria: unknown {unknown}; known: {list(CRITERIA)}")
    if cfg.response_format not in ("json_schema", "json_object", "none"):
        raise errors.InputError(
            f"judge.response_format must be json_schema, json_object or none, got {cfg.response_format!r}"
        )
    for comp in cfg.comparisons:
        if len(comp) != 2 or comp[0] == comp[1]:
            raise errors.InputError(f"judge.comparisons: each entry is two different variants, got {comp!r}")
    if cfg.human_reference not in ("depth1", "all"):
        raise errors.InputError(f"judge.human_reference must be depth1 or all, got {cfg.human_reference!r}")
    if cfg.batch_runner not in ("api", "files"):
        raise errors.InputError(f"judge.batch_runner must be api or files, got {cfg.batch_runner!r}")
    if cfg.token_limit_param not in ("max_completion_tokens", "max_tokens"):
        raise errors.InputError(
            f"judge.token_limit_param must be max_completion_tokens or max_tokens, got {cfg.token_limit_param!r}"
        )


def plan_and_judge(
    items: list[dict], pairs: list[dict], cfg: JudgeConfig, backend, cache: ResponseCache
) -> tuple[list[dict], dict]:
    """Build every judge call, run them concurrently, and assemble judgment rows in a fixed order."""
    calls, builders, skipped = plan_calls(items, pairs, cfg)
    for comparison, n in skipped.items():
        log.warning("pairwise %s: %d prompt(s) skipped, a side has no reply", comparison, n)
    counts = {}
    for b in builders:
        counts[b[0]] = counts.get(b[0], 0) + 1
    log.info("judging: %d call(s) for %s", len(calls), ", ".join(f"{n} {k}" for k, n in counts.items()))
    if cfg.max_cost_usd is not None:
        est = estimate_cost(calls, cfg, cache, backend.params())
        if est["est_cost_usd"] is not None and est["est_cost_usd"] > cfg.max_cost_usd:
            raise JudgeBudgetError(
                f"the {est['new_calls']} new judge call(s) would cost about "
                f"${est['est_cost_usd']:.2f} > judge.max_cost_usd={cfg.max_cost_usd}; nothing "
                f"was sent (cmv judge --dry-run shows the plan)"
            )

    async def go():
        try:
            if hasattr(backend, "prefetch"):
                await backend.prefetch(calls, cache)
            results = await run_calls(calls, backend=backend, cache=cache, cfg=cfg)
            # after the calls: the parameters the server rejected on the way are part of what it is
            return results, (await backend.describe() if hasattr(backend, "describe") else None)
        finally:
            await backend.aclose()

    results, server = asyncio.run(go())
    flow = getattr(backend, "flow", None)
    return assemble_rows(builders, results, cfg), {
        "calls": len(calls),
        "skipped_pairwise": skipped,
        "pair_files": pair_files_summary(pairs),
        "server": server,
        "transport": flow.summary() if flow is not None else None,
    }


def dry_run(generations: str, data: str, output: str, config: JudgeConfig) -> dict:
    """The plan without a single call: calls, how many are cached, estimated tokens and cost."""
    _validate(config)
    items, pairs = load_inputs(generations, data, config)
    calls, _, _ = plan_calls(items, pairs, config)
    cache_uri = config.cache or storage.join(output, "cache")
    # Reading the cache writes nothing (a cache file is only opened on the first put).
    cache = ResponseCache(cache_uri, config.cache_flush_every)
    estimate = estimate_cost(calls, config, cache, planned_params(config))
    return {**estimate, "pair_files": pair_files_summary(pairs)} if config.pair_files else estimate


HUMAN_REFERENCE_TEXT = {
    "depth1": "only delta winners that reply to the post itself (depth 1) are used as the human reference, "
    "and only depth-1 non-delta replies as the ordinary-commenter reference, so the judge sees "
    "everything the human reply answered.",
    "all": "every delta winner is used as the human reference, including deep ones that answered OP "
    "follow-ups the judge does not see in the single view (unfair to the human side).",
}


def stage_seconds(manifest: dict) -> float | None:
    import datetime as dt

    try:
        return (
            dt.datetime.fromisoformat(manifest["finished_at"]) - dt.datetime.fromisoformat(manifest["started_at"])
        ).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def training_seconds(generations: str) -> float | None:
    """How long the training behind these generations ran, to print beside the judge's own time:
    the sum over the train-stage manifests among the generate stage's inputs (SFT, and DPO when its
    model was generated from too); None when none is found."""
    total = None
    try:
        for inp in storage.require_success(generations).get("inputs") or []:
            uri = inp.get("uri") if isinstance(inp, dict) else inp
            if uri and storage.exists(storage.join(uri, "_SUCCESS")):
                manifest = storage.require_success(uri)
                seconds = stage_seconds(manifest) if manifest.get("stage") == "train" else None
                if seconds is not None:
                    total = (total or 0.0) + seconds
    except Exception:  # noqa: BLE001 - a missing or foreign manifest only means "not known"
        return None
    return total


def provenance(rows: list[dict], cfg: JudgeConfig) -> dict:
    """The model snapshots and system fingerprints the endpoint reported, over every call."""
    calls = [c for r in rows for c in (r["orders"] if "orders" in r else [r])]
    return {
        "models": sorted({c["model"] for c in calls if c.get("model")}),
        "system_fingerprints": sorted({c["system_fingerprint"] for c in calls if c.get("system_fingerprint")}),
        "seed": cfg.api_seed if cfg.backend != "local" else None,
    }


def run_judge(
    generations: str, data: str, output: str, config: JudgeConfig, run_id: str | None = None, force: bool = False
) -> dict:
    """Judge the generate stage's replies; writes judgments.jsonl, report.json, report.md and plots."""
    from cmv_core import config as config_mod

    _validate(config)
    # Begin (skipped when _SUCCESS matches inputs and config)
    run = storage.begin_stage(
        "judge", output, inputs=[generations, data], config=config_mod.to_dict(config), run_id=run_id, force=force
    )
    if run is None:
        return storage.require_success(output)
    started = time.monotonic()

    # Load
    items, pairs = load_inputs(generations, data, config)

    # Judge (through the cache)
    cache = ResponseCache(config.cache or storage.join(output, "cache"), config.cache_flush_every)
    try:
        backend = make_backend(config)
        rows, plan = plan_and_judge(items, pairs, config, backend, cache)
    finally:
        cache.close()

    # Write judgments, report and plots
    storage.write_jsonl(storage.join(output, "judgments.jsonl"), rows)
    meta = report_meta(run.run_id, generations, data, config, items, rows, plan, started)
    report = write_report(output, rows, meta, config)
    log_usage(rows, report, meta, started)

    # Check: too many failed calls fail the stage (no _SUCCESS; a rerun reuses the cache)
    check_failures(rows, report, output, config)

    # Finish: _SUCCESS last
    return storage.finish_stage(run, run_summary(report, meta, rows), declared=True)


def report_meta(
    run_id: str,
    generations: str,
    data: str,
    config: JudgeConfig,
    items: list[dict],
    rows: list[dict],
    plan: dict,
    started: float,
) -> dict:
    """What the report says about the run besides the judgments: judge, plan, references, time."""
    return {
        "run_id": run_id,
        "rubric_version": RUBRIC_VERSION,
        "backend": config.backend,
        "judge_model": config.model,
        "n_prompts": len(items),
        "calls_planned": plan["calls"],
        "skipped_pairwise": plan["skipped_pairwise"],
        **({"pair_files": plan["pair_files"]} if plan.get("pair_files") else {}),
        "prices_usd_per_mtok": config.prices.get(price_name(config)),
        "comparisons": [list(c) for c in config.comparisons],
        "base_variant": "base",
        "human_variant": HUMAN,
        "human_reference": HUMAN_REFERENCE_TEXT[config.human_reference]
        + (f" Every text passes the same cut rule: at most {config.max_text_chars} characters, marked '[...cut]'."),
        "time_split_utc": time_split_utc(data, config),
        "provenance": provenance(rows, config),
        "judge_server": plan.get("server"),
        "transport": plan.get("transport"),
        "judge_seconds": round(time.monotonic() - started, 1),
        "train_seconds": training_seconds(generations),
    }


def write_report(output: str, rows: list[dict], meta: dict, config: JudgeConfig) -> dict:
    """Build the report and write its plots, report.json and report.md; returns the report."""
    from cmv_core.report.build import build_report
    from cmv_core.report.markdown import render_markdown
    from cmv_core.report.plots import render_plots

    report = build_report(rows, criteria=config.criteria, meta=meta, n_boot=config.bootstrap_samples, seed=config.seed)
    plots = render_plots(report)
    for name, png in plots.items():
        storage.write_bytes(storage.join(output, name), png)
    report["plots"] = sorted(plots)
    storage.write_json(storage.join(output, "report.json"), report)
    storage.write_text(storage.join(output, "report.md"), render_markdown(report, sorted(plots)))
    return report


def log_usage(rows: list[dict], report: dict, meta: dict, started: float) -> None:
    """The calls, tokens and cost of the run in the log, and the judge's time beside training's."""
    usage, failures = report["usage"], report["failures"]
    log.info(
        "judge: %d judgment(s), %d call(s) (%d cached, %d new), %d failed call(s), %d+%d tokens, $%.4f "
        "this run, %.1f s",
        len(rows),
        usage["attempts"],
        usage["cached_calls"],
        usage["new_calls"],
        failures["failed_calls"],
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["cost_usd_this_run"],
        time.monotonic() - started,
    )
    if meta.get("transport"):
        t = meta["transport"]
        log.info(
            "judge transport: %d request(s), %d call(s) sent again, %d timeout(s), %d 429/503, "
            "calls in flight at least %d, at the end %d, %s tokens/s",
            t["requests"],
            t["retried_calls"],
            t["timeouts"],
            t["overloaded"],
            t["min_window"],
            t["final_window"],
            t["tokens_per_s"],
        )
    train_s = meta["train_seconds"]
    print(
        f"judge time {meta['judge_seconds']:.0f} s" + (f" (training took {train_s:.0f} s)" if train_s else ""),
        flush=True,
    )


def check_failures(rows: list[dict], report: dict, output: str, config: JudgeConfig) -> None:
    """JudgeFailed when more than judge.max_failed_fraction of the calls failed."""
    failures = report["failures"]
    total_calls = sum(len(r.get("orders", [r])) for r in rows)
    if total_calls and failures["failed_calls"] / total_calls > config.max_failed_fraction:
        raise JudgeFailed(
            f"{failures['failed_calls']} of {total_calls} judge calls failed "
            f"(> judge.max_failed_fraction={config.max_failed_fraction}); see "
            f"{storage.join(output, 'report.md')}. No _SUCCESS written; a rerun reuses the cache."
        )


def run_summary(report: dict, meta: dict, rows: list[dict]) -> dict:
    """The manifest's summary: judgments, failures, time, calls, tokens, cost, calibration accuracy."""
    usage, failures = report["usage"], report["failures"]
    summary = {
        "judgments": len(rows),
        "failed_calls": failures["failed_calls"],
        "judge_seconds": meta["judge_seconds"],
        "train_seconds": meta["train_seconds"],
        "excluded_judgments": failures["excluded_judgments"],
        "calls": usage["attempts"],
        "cached_calls": usage["cached_calls"],
        "new_calls": usage["new_calls"],
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "cost_usd": usage["cost_usd"],
        "cost_usd_this_run": usage["cost_usd_this_run"],
    }
    if meta.get("transport"):
        # calls sent more than once (a timeout, a 429/5xx, a rejected parameter), and the window's range
        summary["transport"] = meta["transport"]
    if report["calibration"]:
        summary["calibration_accuracy"] = report["calibration"]["accuracy"]["rate"]
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generations", required=True, help="generate stage output (dir or URI)")
    parser.add_argument("--data", required=True, help="format stage output (test.jsonl, pairs.jsonl)")
    parser.add_argument("--output", required=True, help="where judgments and the report go (dir or URI)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the number of judge calls, estimated tokens and cost, and exit (nothing is sent)",
    )


def cli_main(args: argparse.Namespace) -> int:
    from cmv_core import config as config_mod

    recipe = config_mod.load_recipe(args.config, args.set)
    cfg = config_mod.section(recipe, "judge", JudgeConfig)
    if getattr(args, "dry_run", False):
        est = dry_run(args.generations, args.data, args.output, cfg)
        cost = "unpriced" if est["est_cost_usd"] is None else f"${est['est_cost_usd']:.4f}"
        print(
            f"dry run: {est['calls']} judge call(s), {est['new_calls']} new ({est['cached_calls']} cached); "
            f"estimated {est['est_prompt_tokens']} prompt tokens (by {est['est_prompt_tokens_by']}) + "
            f"{est['est_completion_tokens']} completion tokens (a third of max_tokens per call); "
            f"estimated cost {cost} (re-asks after unparseable answers not included)"
        )
        print(json.dumps(est))
        return 0
    manifest = run_judge(args.generations, args.data, args.output, cfg, run_id=args.run_id, force=args.force)
    print(f"report: {storage.join(args.output, 'report.md')}")
    summary = manifest.get("summary", {})
    print(
        json.dumps(
            {
                k: summary.get(k)
                for k in (
                    "judgments",
                    "failed_calls",
                    "new_calls",
                    "cached_calls",
                    "cost_usd_this_run",
                    "calibration_accuracy",
                )
            }
        )
    )
    return 0
