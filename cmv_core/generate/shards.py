"""Resumable shards: which prompts a shard holds, its seed, keeping shards across a rerun, the final concatenation.

A shard (``shards/<variant>-<k>.jsonl``) is written atomically and is a
deterministic function of its prompts and the config, so a rerun after a kill
keeps the shards already written and makes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import logging

from cmv_core import storage
from cmv_core.generate.config import GENERATIONS, PLAN, STATS, GenerateConfig, Prompt, Reply, Variant

log = logging.getLogger(__name__)


def shard_ranges(n: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def shard_name(variant: str, k: int) -> str:
    return f"{variant}-{k:05d}.jsonl"


def shard_seed(seed: int, variant: str, k: int) -> int:
    """A seed per shard, so a shard made after a restart samples exactly as before."""
    digest = hashlib.sha256(f"{seed}:{variant}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generation_row(prompt: Prompt, variant: Variant, reply: Reply, sample: int | None = None) -> dict:
    """One output line; ``sample`` (0..n-1) and ``adapter_stacked_on`` only where they apply."""
    row = {
        "id": prompt.id,
        "thread_id": prompt.thread_id,
        "model": variant.name,
        "model_path": variant.model,
        "adapter_path": variant.adapter,
        "messages": prompt.messages,
        "response": reply.response,
        "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
    }
    if variant.stacked_on:
        row["adapter_stacked_on"] = variant.stacked_on
    if sample is not None:
        row["sample"] = sample
    return row


def write_shard(shards: str, variant: Variant, k: int, rows: list[dict], seconds: float) -> None:
    """Meta first, rows last: a shard counts as done once its rows exist."""
    storage.write_json(storage.join(shards, shard_name(variant.name, k) + ".meta.json"), {"seconds": seconds})
    storage.write_jsonl(storage.join(shards, shard_name(variant.name, k)), rows)


def prepare_shards(shards: str, run: storage.StageRun) -> set[str]:
    """Keep shards made with the same inputs and config; drop any others. Returns the kept names."""
    plan = {"inputs": run.inputs, "config": run.config}
    plan_uri = storage.join(shards, PLAN)
    try:
        same = storage.read_json(plan_uri) == plan
    except FileNotFoundError:
        same = False
    if not same:
        if storage.list_files(shards):
            log.info("%s: shards from another config or input: starting over", shards)
            storage.delete_prefix(shards)
        storage.write_json(plan_uri, plan)
        return set()
    return {name for name in storage.list_files(shards) if name.endswith(".jsonl")}


def write_outputs(
    output: str,
    shards: str,
    variants: list[Variant],
    n_shards: int,
    config: GenerateConfig,
    resumed: int,
    engines: list[dict] = (),
) -> dict:
    """Concatenate the shards into ``generations.jsonl`` (variant order, then shard order); write ``stats.json``.

    ``engines``: what each engine opened by this run said of itself (none when every shard was resumed).
    """
    per_variant = {}
    total = 0
    with storage.open_write(storage.join(output, GENERATIONS), "wb") as out:
        for v in variants:
            per_variant[v.name] = _copy_variant_shards(out, shards, v, n_shards)
            total += per_variant[v.name]["prompts"]
    stats = {
        "backend": config.backend,
        "engines": list(engines),
        "generations": total,
        "prompts": total // max(1, len(variants) * config.n),
        "samples_per_prompt": config.n,
        "variants": per_variant,
        "shards": n_shards * len(variants),
        "shards_resumed": resumed,
    }
    storage.write_json(storage.join(output, STATS), stats)
    return stats


def _copy_variant_shards(out, shards: str, v: Variant, n_shards: int) -> dict:
    """Append one variant's shards to ``out``; its counts and tokens/s (over the shards that were timed)."""
    counts = {"prompts": 0, "prompt_tokens": 0, "completion_tokens": 0, "stop": 0, "length": 0}
    seconds, timed_tokens = 0.0, 0
    for k in range(n_shards):
        uri = storage.join(shards, shard_name(v.name, k))
        shard_tokens = 0
        with storage.open_read(uri, "rb") as f:
            for line in f:
                out.write(line)
                row = json.loads(line)
                counts["prompts"] += 1
                counts["prompt_tokens"] += row["prompt_tokens"]
                counts["completion_tokens"] += row["completion_tokens"]
                counts[row["finish_reason"]] += 1
                shard_tokens += row["completion_tokens"]
        meta_uri = uri + ".meta.json"
        if storage.exists(meta_uri):
            seconds += storage.read_json(meta_uri)["seconds"]
            timed_tokens += shard_tokens
    return {
        **counts,
        "model_path": v.model,
        "adapter_path": v.adapter,
        "generate_seconds": round(seconds, 3),
        "completion_tokens_per_s": round(timed_tokens / seconds, 2) if seconds > 0 else None,
        "mean_completion_tokens": round(counts["completion_tokens"] / max(1, counts["prompts"]), 2),
    }
