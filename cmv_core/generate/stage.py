"""Generate stage: a reply to every test prompt from each model variant.

Reads the format stage's ``test.jsonl`` (a prompt is the conversation up to,
not including, its first assistant turn) and writes, for each variant
(typically ``base`` and ``finetuned``, so both answer the same prompts):

- ``generations.jsonl``: one line per prompt and variant, in a fixed order
  (variant order, then test-file order): ``id``, ``thread_id``, ``model``
  (variant name), ``model_path``, ``adapter_path``, ``messages`` (the prompt),
  ``response``, ``finish_reason`` ("stop" | "length"), ``prompt_tokens``,
  ``completion_tokens``;
- ``stats.json``: counts and tokens/s per variant.

Two backends, one output schema, chosen by ``generate.backend``:

- ``transformers``: batched ``generate()`` on CPU or GPU; prompts sorted by
  length so a batch wastes little padding, left padding, the model's chat
  template, stop at the end-of-turn token(s), only the new tokens decoded.
- ``vllm`` (GPU image, or vLLM's CPU build: make test-engines; imported lazily): ``LLM.chat`` over a whole
  shard, LoRA adapters through ``LoRARequest`` so base, fine-tuned and DPO share one engine
  (``finetuned_weights: adapter``, the default on this backend).

Work is cut into shards (``shards/<variant>-<k>.jsonl``, each written
atomically). A rerun after a kill keeps the shards already written and makes
only the missing ones; every shard is a deterministic function of its prompts
and the config (greedy decoding, or sampling seeded per shard and batch), so a
resumed run writes the same ``generations.jsonl`` as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable

from cmv_core import storage
from cmv_core.config import load_recipe, model_spec, section
from cmv_core.generate.backends import engine_groups, open_backend
from cmv_core.generate.config import (
    GENERATIONS,
    SHARDS,
    GenerateConfig,
    Prompt,
    Variant,
    check_config,
    finetuned_weights_for,
)
from cmv_core.generate.prompts import load_prompts
from cmv_core.generate.shards import (
    generation_row,
    prepare_shards,
    shard_name,
    shard_ranges,
    shard_seed,
    write_outputs,
    write_shard,
)
from cmv_core.generate.variants import variants_from_args

log = logging.getLogger(__name__)

STAGE = "generate"


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="format stage output (dir or URI) with test.jsonl")
    parser.add_argument(
        "--model",
        help="base model: embedded:..., dir, s3:// URI or Hub name (default: the recipe's model:); "
        "a train stage output here is read as --trained",
    )
    parser.add_argument("--trained", help="train stage output (dir or URI): adds the 'finetuned' variant")
    parser.add_argument("--adapter", help="LoRA adapter (dir or URI) on --model: adds the 'finetuned' variant")
    parser.add_argument("--dpo", help="DPO train output (dir or URI; cmv train --method dpo): adds the 'dpo' variant")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=MODEL[,adapter=ADAPTER]",
        help="an explicit model variant (repeatable); replaces --model/--trained/--adapter",
    )
    parser.add_argument("--output", required=True, help="output dir or URI")


def cli_main(args: argparse.Namespace) -> int:
    recipe = load_recipe(getattr(args, "config", None), getattr(args, "set", None) or [])
    config = section(recipe, "generate", GenerateConfig)
    if args.model or args.trained or args.adapter or args.dpo or args.variant or not config.variants:
        variants = variants_from_args(
            model=args.model,
            recipe_model=model_spec(recipe),
            trained=args.trained,
            adapter=args.adapter,
            dpo=args.dpo,
            variant_args=args.variant,
            finetuned_weights=finetuned_weights_for(config),
        )
        config = dataclasses.replace(config, variants=[dataclasses.asdict(v) for v in variants])
    run_generate(args.data, args.output, config, run_id=args.run_id, force=args.force)
    return 0


# ---------------------------------------------------------------- stage


def run_generate(
    data: str,
    output: str,
    config: GenerateConfig,
    run_id: str | None = None,
    force: bool = False,
    *,
    after_shard: Callable[[str, int], None] | None = None,
) -> dict:
    """Run the generate stage; returns the ``_SUCCESS`` manifest (the old one when skipped).

    ``after_shard(variant, k)`` is called after each shard is written (tests
    use it to simulate a kill).
    """
    # Check: the settings and variants; skip when the same inputs and config are already done
    variants = check_config(config)
    inputs = [data] + sorted({root for v in variants for root in _stage_roots(v)})
    run = storage.begin_stage(
        STAGE, output, inputs=inputs, config=dataclasses.asdict(config), run_id=run_id, force=force
    )
    if run is None:
        return storage.require_success(output)

    # Load
    prompts = load_prompts(data, config.max_prompts)
    ranges = shard_ranges(len(prompts), config.shard_size)
    shards = storage.join(output, SHARDS)
    done = prepare_shards(shards, run)
    todo = [(v, k) for v in variants for k in range(len(ranges)) if shard_name(v.name, k) not in done]
    log.info(
        "%d prompts x %d variants = %d shards; %d already written, %d to make (backend %s)",
        len(prompts),
        len(variants),
        len(variants) * len(ranges),
        len(variants) * len(ranges) - len(todo),
        len(todo),
        config.backend,
    )

    # Generate: one loaded model (or vLLM engine) per group of variants
    engines = _make_shards(prompts, ranges, variants, todo, shards, config, after_shard)

    # Write: concatenate in a fixed order, then the stats, then _SUCCESS
    stats = write_outputs(output, shards, variants, len(ranges), config, resumed=len(done), engines=engines)
    storage.delete_prefix(shards)
    log.info("wrote %d generations to %s", stats["generations"], storage.join(output, GENERATIONS))
    return storage.finish_stage(run, stats, declared=True)


def _make_shards(
    prompts: list[Prompt],
    ranges: list[range],
    variants: list[Variant],
    todo: list[tuple[Variant, int]],
    shards: str,
    config: GenerateConfig,
    after_shard: Callable[[str, int], None] | None,
) -> list[dict]:
    """Write each shard in ``todo`` (variant, k), opening one backend per group of variants that has work.

    Returns what each opened engine says of itself (backend, version, start seconds, LoRA adapters).
    """
    from tqdm.auto import tqdm

    progress = tqdm(total=sum(len(ranges[k]) for _, k in todo), desc="generate", unit="prompt")
    engines = []
    for group in engine_groups(variants, config.backend):
        group_todo = [(v, k) for v, k in todo if v in group]
        if not group_todo:
            continue
        with open_backend(group, config) as generate:
            engines.append(getattr(generate, "engine", None) or {"backend": config.backend})
            for v, k in group_todo:
                batch = [prompts[i] for i in ranges[k]]
                started = time.perf_counter()
                replies = generate(v, batch, shard_seed(config.seed, v.name, k))
                seconds = time.perf_counter() - started
                # n samples per prompt come back prompt by prompt: sample j of prompt i at i * n + j
                samples = [(p, j if config.n > 1 else None) for p in batch for j in range(config.n)]
                rows = [generation_row(p, v, r, j) for (p, j), r in zip(samples, replies, strict=True)]
                write_shard(shards, v, k, rows, seconds)
                progress.update(len(batch))
                if after_shard is not None:
                    after_shard(v.name, k)
    progress.close()
    return engines


def _stage_roots(v: Variant) -> list[str]:
    """Stage outputs a variant reads (their manifests become inputs, so a retrain reruns generation)."""
    roots = []
    for uri in (v.model, v.adapter):
        if not uri or uri.startswith("embedded:") or not (storage.is_s3(uri) or "/" in uri):
            continue
        parent = uri.rstrip("/").rsplit("/", 1)[0]
        for candidate in (uri, parent):
            if storage.exists(storage.join(candidate, storage.SUCCESS)):
                roots.append(candidate)
                break
    return roots
