"""What the judge calls are (the plan), what the new ones would cost, and which backend answers them."""

from __future__ import annotations

import json
import logging
import os
import re

from cmv_core.judge.backends.batch import BatchBackend
from cmv_core.judge.backends.local import LocalBackend, local_dtype
from cmv_core.judge.backends.openai import OpenAIBackend, request_params
from cmv_core.judge.cache import ResponseCache, cache_key, key_backend
from cmv_core.judge.config import HUMAN, JudgeConfig, price_name
from cmv_core.judge.prompts import (
    CALIBRATION_FORM,
    CALIBRATION_INSTRUCTIONS,
    PAIRWISE_FORM,
    PAIRWISE_INSTRUCTIONS,
    single_form,
    single_messages,
    two_reply_messages,
)
from cmv_core.judge.rows import word_count

log = logging.getLogger(__name__)


def trimmed(text: str, keep: float = 0.6) -> str:
    """The first ``keep`` share of a reply's sentences (at least one, one fewer than all): the
    same content, shorter, for the length probe."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    if len(sentences) < 2:
        words = text.split()
        return " ".join(words[: max(1, int(len(words) * keep))])
    n = min(len(sentences) - 1, max(1, round(len(sentences) * keep)))
    return " ".join(sentences[:n])


def thread_humans(items: list[dict]) -> list[tuple[dict, dict]]:
    """(item, human reply) for the human replies of each item's thread (``thread_humans``, set by
    inputs.load_inputs), once per thread: the replies each variant's reply is ranked among."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item["thread_id"] not in seen:
            seen.add(item["thread_id"])
            out += [(item, human) for human in item.get("thread_humans") or []]
    return out


def plan_calls(items: list[dict], pairs: list[dict], cfg: JudgeConfig) -> tuple[list, list, dict]:
    """Every judge call (messages, form) and how its results map back to judgment rows."""
    calls: list[tuple[list[dict], dict]] = []
    builders = []  # (kind, context, start, n) so results map back in order
    sform = single_form(cfg.criteria)
    skipped: dict[str, int] = {}
    pairs = [p for p in pairs if "skip" not in p]  # a published pair left out (inputs.load_pair_file): counted only

    def two(instructions, form, prompt, x, y):
        calls.append((two_reply_messages(instructions, form, prompt, x, y, cfg.max_text_chars), form))
        calls.append((two_reply_messages(instructions, form, prompt, y, x, cfg.max_text_chars), form))

    if cfg.single:
        variants = sorted({v for i in items for v in i["replies"] if not v.startswith(HUMAN) or cfg.grade_human})
        for variant in variants:
            for item in items:
                if variant in item["replies"]:
                    builders.append(("single", (item, variant), len(calls), 1))
                    calls.append(
                        (
                            single_messages(item["prompt"], item["replies"][variant], cfg.criteria, cfg.max_text_chars),
                            sform,
                        )
                    )
        # The thread's human replies, graded in the same single-reply form, once per thread.
        for item, human in thread_humans(items):
            builders.append(("human_reply", (item, human), len(calls), 1))
            calls.append((single_messages(human["prompt"], human["text"], cfg.criteria, cfg.max_text_chars), sform))
    if cfg.pairwise:
        present = {v for i in items for v in i["replies"]}
        for a, b in cfg.comparisons:
            comparison = f"{a}_vs_{b}"
            if a not in present or b not in present:
                log.info(
                    "pairwise %s: no replies of %s in the generations; comparison left out",
                    comparison,
                    " or ".join(v for v in (a, b) if v not in present),
                )
                continue
            for item in items:
                if a not in item["replies"] or b not in item["replies"]:
                    skipped[comparison] = skipped.get(comparison, 0) + 1
                    continue
                builders.append(("pairwise", (comparison, item, a, b), len(calls), 2))
                two(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, item["prompt"], item["replies"][a], item["replies"][b])
        # The length probe: a model's reply against its own trimmed version (same content, shorter).
        probe_variant = next((a for a, _ in cfg.comparisons if not a.startswith(HUMAN)), None)
        probed = [i for i in items if probe_variant in i["replies"]][: max(0, cfg.length_probe_items)]
        for item in probed:
            full = item["replies"][probe_variant]
            short = trimmed(full)
            if word_count(short) >= word_count(full):
                continue
            probe_item = {
                **item,
                "replies": {"full": full, "trimmed": short},
                "finish": {"full": item["finish"].get(probe_variant), "trimmed": "stop"},
            }
            builders.append(("length_probe", ("full_vs_trimmed", probe_item, "full", "trimmed"), len(calls), 2))
            two(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, item["prompt"], full, short)
    for pair in pairs:
        builders.append(("calibration", (pair,), len(calls), 2))
        two(CALIBRATION_INSTRUCTIONS, CALIBRATION_FORM, pair["prompt"], pair["winner"], pair["loser"])
    if cfg.validate_instruments:
        for pair in pairs:
            if cfg.pairwise:
                builders.append(("validation_pairwise", (pair,), len(calls), 2))
                two(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, pair["prompt"], pair["winner"], pair["loser"])
            if cfg.single:
                builders.append(("validation_single", (pair,), len(calls), 2))
                for text in (pair["winner"], pair["loser"]):
                    calls.append((single_messages(pair["prompt"], text, cfg.criteria, cfg.max_text_chars), sform))
    return calls, builders, skipped


def prompt_counter(cfg: JudgeConfig):
    """How to count a call's prompt tokens, and its name: the local judge's own tokenizer (or
    judge.tokenizer, a served model's), applied as the local backend and an OpenAI-compatible server
    apply it (chat template + generation prompt); an API model's tokenizer is not at hand, so
    characters / 4 there."""
    if cfg.backend != "local" and not cfg.tokenizer:
        return (lambda messages: len(json.dumps(messages, ensure_ascii=False)) // 4), "characters/4"
    from cmv_core.models import load_tokenizer

    tok = load_tokenizer(cfg.model if cfg.backend == "local" else cfg.tokenizer)

    def count(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))

    return count, "judge tokenizer"


def estimate_cost(
    calls: list[tuple[list[dict], dict]], cfg: JudgeConfig, cache: ResponseCache | None, params: dict
) -> dict:
    """Calls not in the cache, their estimated tokens (prompt: see prompt_counter; completion: up to
    max_tokens, estimated at a third) and cost at the configured price (batch price for the Batch
    backend). Re-asks after unparseable answers come on top."""
    new, planned = [], set()
    for m, f in calls:
        key = cache_key(key_backend(cfg), cfg.model, m, f, params)
        # A prompt the plan asks twice (two instruments on one pair) is sent once, then cached.
        if key not in planned and (cache is None or cache.get(key) is None):
            new.append((m, f))
        planned.add(key)
    count, counted_by = prompt_counter(cfg)
    prompt = sum(count(m) for m, _ in new)
    completion = len(new) * max(1, cfg.max_tokens // 3)
    price = cfg.prices.get(price_name(cfg))
    cost = None if price is None else (prompt * price["input"] + completion * price["output"]) / 1e6
    if cfg.backend == "local":
        cost = 0.0
    return {
        "calls": len(calls),
        "new_calls": len(new),
        "cached_calls": len(calls) - len(new),
        "est_prompt_tokens": prompt,
        "est_prompt_tokens_by": counted_by,
        "est_completion_tokens": completion,
        "est_cost_usd": cost,
        "price": price_name(cfg) if price else None,
    }


def planned_params(cfg: JudgeConfig) -> dict:
    """The backend's params() without building a client (the dry run needs no key or model)."""
    if cfg.backend == "local":
        return {"rationale_tokens": cfg.local_rationale_tokens, "dtype": local_dtype(cfg.local_dtype)}
    return request_params(cfg, cfg.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")


def make_backend(cfg: JudgeConfig):
    if cfg.backend == "openai":
        return OpenAIBackend(cfg)
    if cfg.backend == "openai-batch":
        return BatchBackend(cfg)
    if cfg.backend == "local":
        return LocalBackend(cfg)
    raise ValueError(f"judge.backend must be 'openai', 'openai-batch' or 'local', got {cfg.backend!r}")
