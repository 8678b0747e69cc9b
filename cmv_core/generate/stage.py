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
- ``vllm`` (GPU image only, imported lazily): ``LLM.chat`` over a whole shard,
  LoRA adapters through ``LoRARequest`` so base and fine-tuned share one engine.

Work is cut into shards (``shards/<variant>-<k>.jsonl``, each written
atomically). A rerun after a kill keeps the shards already written and makes
only the missing ones; every shard is a deterministic function of its prompts
and the config (greedy decoding, or sampling seeded per shard and batch), so a
resumed run writes the same ``generations.jsonl`` as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cmv_core import errors, storage

log = logging.getLogger(__name__)

STAGE = "generate"
GENERATIONS = "generations.jsonl"
STATS = "stats.json"
SHARDS = "shards"
PLAN = "_plan.json"
BACKENDS = ("transformers", "vllm")
FINETUNED_WEIGHTS = ("merged", "adapter")

# Tokens that end an assistant turn in the chat templates we meet (Llama 3:
# <|eot_id|>; SmolLM2/ChatML: <|im_end|>; others). Stopping on any of them is
# always right for a reply; the model's own eos ids are added to these.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")

# vLLM accepts only these values for ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Engine arguments this module sets itself; set them through the generate section, not vllm_engine_args.
VLLM_RESERVED_ENGINE_ARGS = ("model", "tokenizer", "tensor_parallel_size", "seed", "enable_lora")

_VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class InputError(errors.InputError):
    """Bad input or settings: reported as one clear line, exit code 2."""


@dataclass
class GenerateConfig:
    """The recipe's ``generate:`` section."""

    backend: str = "transformers"  # transformers | vllm
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy decoding
    top_p: float = 1.0
    seed: int = 0
    max_prompts: int | None = None  # only the first N test prompts (demo, smoke tests)
    shard_size: int = 64  # prompts per resumable shard
    batch_size: int = 8  # transformers: prompts per generate() call
    device: str = "auto"  # transformers: auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # transformers: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    # How a train stage output becomes the "finetuned" variant: its merged
    # model/ (a separate model), or base model + its adapter/ (vLLM then serves
    # base and fine-tuned from one engine through LoRARequest).
    finetuned_weights: str = "merged"
    tensor_parallel_size: int = 1  # vllm
    vllm_engine_args: dict = field(default_factory=dict)  # passed to vllm.LLM as is (gpu_memory_utilization, ...)
    # Filled from the command line (--model/--trained/--adapter/--variant);
    # a recipe may also list them: [{name, model, adapter}].
    variants: list = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # model spec: embedded:..., local dir, file://, s3://, or a Hub name
    adapter: str | None = None  # LoRA adapter dir/URI applied on top of ``model``


@dataclass(frozen=True)
class Prompt:
    id: str
    thread_id: str
    messages: list


@dataclass(frozen=True)
class Reply:
    response: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


# A backend: (variant, prompts, seed) -> one Reply per prompt, same order.
GenerateFn = Callable[[Variant, list, int], list]


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
    from cmv_core.config import load_recipe, model_spec, section

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
            finetuned_weights=config.finetuned_weights,
        )
        config = dataclasses.replace(config, variants=[dataclasses.asdict(v) for v in variants])
    run_generate(args.data, args.output, config, run_id=args.run_id, force=args.force)
    return 0


# ---------------------------------------------------------------- variants


def parse_variant(text: str) -> tuple[str, str, str | None]:
    """``NAME=MODEL[,adapter=ADAPTER]`` -> (name, model, adapter)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise InputError(f"--variant {text!r}: expected NAME=MODEL[,adapter=ADAPTER]")
    model, _, adapter = rest.partition(",adapter=")
    return name.strip(), model.strip(), (adapter.strip() or None)


def is_train_output(uri: str) -> bool:
    """A finished train stage output (its ``_SUCCESS`` says stage train)."""
    if not uri or uri.startswith("embedded:"):
        return False
    try:
        return storage.require_success(uri).get("stage") == "train"
    except (storage.MissingInputError, OSError, ValueError):
        return False


def trained_variant(name: str, trained: str, base_model: str, finetuned_weights: str) -> Variant:
    """The variant a train stage output stands for: its merged ``model/``, or base + its ``adapter/``."""
    manifest = storage.require_success(trained)
    files = {f["path"] for f in manifest.get("files", [])}
    has_model = "model/config.json" in files
    has_adapter = "adapter/adapter_config.json" in files
    # An adapter goes on the model it was trained from, as the train manifest records it.
    trained_from = (manifest.get("config") or {}).get("model")
    if isinstance(trained_from, str) and trained_from:
        base_model = trained_from
    if finetuned_weights == "adapter" and has_adapter:
        return Variant(name, base_model, storage.join(trained, "adapter"))
    if has_model:
        if finetuned_weights == "adapter":
            log.info("%s has no adapter/ (a full fine-tune?): using its merged model/", trained)
        return Variant(name, storage.join(trained, "model"))
    if has_adapter:
        return Variant(name, base_model, storage.join(trained, "adapter"))
    raise InputError(f"{trained}: the train output has neither model/config.json nor adapter/adapter_config.json")


def variants_from_args(
    *,
    model: str | None,
    recipe_model: str,
    trained: str | None = None,
    adapter: str | None = None,
    variant_args: list[str] = (),
    finetuned_weights: str = "merged",
    dpo: str | None = None,
) -> list[Variant]:
    """The variants a command line asks for.

    Explicit ``--variant``s win (a train output as MODEL is read as one).
    Otherwise ``base`` (``--model``, default the recipe's model) plus
    ``finetuned`` when a train output or an adapter is given, plus ``dpo`` when a
    DPO train output is given (its adapter goes on the model it was trained from,
    the SFT model). A train output passed as ``--model`` counts as ``--trained``;
    its base is the recipe's model.
    """
    if variant_args:
        if model or trained or adapter or dpo:
            raise InputError("--variant replaces --model/--trained/--adapter: give one or the other")
        out = []
        for text in variant_args:
            name, spec, adapter_uri = parse_variant(text)
            if not adapter_uri and is_train_output(spec):
                out.append(trained_variant(name, spec, recipe_model, finetuned_weights))
            else:
                out.append(Variant(name, spec, adapter_uri))
        return out
    if model and is_train_output(model):
        if trained:
            raise InputError(f"--model {model} is a train output and --trained is given too")
        trained, model = model, None
    if trained and adapter:
        raise InputError("give --trained or --adapter, not both")
    base = model or recipe_model
    variants = [Variant("base", base)]
    if trained:
        variants.append(trained_variant("finetuned", trained, base, finetuned_weights))
    elif adapter:
        variants.append(Variant("finetuned", base, adapter))
    if dpo:
        variants.append(trained_variant("dpo", dpo, base, finetuned_weights))
    return variants


def check_config(config: GenerateConfig) -> list[Variant]:
    """Validate the config; the variants as objects."""
    if config.backend not in BACKENDS:
        raise InputError(f"generate.backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.finetuned_weights not in FINETUNED_WEIGHTS:
        raise InputError(f"generate.finetuned_weights must be one of {', '.join(FINETUNED_WEIGHTS)}")
    for key in ("max_new_tokens", "shard_size", "batch_size", "tensor_parallel_size"):
        if getattr(config, key) < 1:
            raise InputError(f"generate.{key} must be >= 1, got {getattr(config, key)}")
    if config.temperature < 0 or not 0 < config.top_p <= 1:
        raise InputError("generate.temperature must be >= 0 and generate.top_p in (0, 1]")
    if not config.variants:
        raise InputError("no model variants: pass --model/--trained/--adapter or --variant")
    variants = []
    for item in config.variants:
        try:
            v = item if isinstance(item, Variant) else Variant(**item)
        except TypeError:
            raise InputError(f"generate.variants: {item!r} must have name, model and optionally adapter") from None
        if not _VARIANT_NAME.match(v.name):
            raise InputError(f"variant name {v.name!r}: use letters, digits, '_', '.', '-' only")
        variants.append(v)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InputError(f"variant names must be unique, got {names}")
    return variants


# ---------------------------------------------------------------- prompts


def prompt_messages(messages: Any) -> list[dict]:
    """The conversation up to, not including, the first assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    prompt = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs string 'role' and 'content'")
        if m["role"] == "assistant":
            break
        prompt.append({"role": m["role"], "content": m["content"]})
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt (messages before the first assistant turn) must end with a user turn")
    return prompt


def test_file(data: str) -> str:
    for name in ("test.jsonl", "test.jsonl.gz"):
        uri = storage.join(data, name)
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(f"{data} has no test.jsonl")


def load_prompts(data: str, max_prompts: int | None = None) -> list[Prompt]:
    """Test prompts in file order; a bad line is an error naming file and line."""
    uri = test_file(data)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    with storage.open_read(uri, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_prompts is not None and len(prompts) >= max_prompts:
                break
            try:
                row = json.loads(line)
                thread_id = str(row["thread_id"])
                pid = str(row.get("id") or thread_id)
                messages = prompt_messages(row.get("messages"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                why = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
                raise InputError(f"{uri}:{lineno}: {why}") from None
            if pid in seen:
                raise InputError(f"{uri}:{lineno}: duplicate id {pid!r} (first on line {seen[pid]})")
            seen[pid] = lineno
            prompts.append(Prompt(pid, thread_id, messages))
    if not prompts:
        raise InputError(f"{uri}: no prompts")
    return prompts


# ---------------------------------------------------------------- shards


def shard_ranges(n: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def shard_name(variant: str, k: int) -> str:
    return f"{variant}-{k:05d}.jsonl"


def shard_seed(seed: int, variant: str, k: int) -> int:
    """A seed per shard, so a shard made after a restart samples exactly as before."""
    digest = hashlib.sha256(f"{seed}:{variant}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generation_row(prompt: Prompt, variant: Variant, reply: Reply) -> dict:
    return {
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


def _prepare_shards(shards: str, run: storage.StageRun) -> set[str]:
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
    done = _prepare_shards(shards, run)
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
    from tqdm.auto import tqdm

    progress = tqdm(total=sum(len(ranges[k]) for _, k in todo), desc="generate", unit="prompt")
    for group in _engine_groups(variants, config.backend):
        group_todo = [(v, k) for v, k in todo if v in group]
        if not group_todo:
            continue
        with open_backend(group, config) as generate:
            for v, k in group_todo:
                batch = [prompts[i] for i in ranges[k]]
                started = time.perf_counter()
                replies = generate(v, batch, shard_seed(config.seed, v.name, k))
                seconds = time.perf_counter() - started
                rows = [generation_row(p, v, r) for p, r in zip(batch, replies, strict=True)]
                # Meta first, rows last: a shard counts as done once its rows exist.
                storage.write_json(storage.join(shards, shard_name(v.name, k) + ".meta.json"), {"seconds": seconds})
                storage.write_jsonl(storage.join(shards, shard_name(v.name, k)), rows)
                progress.update(len(batch))
                if after_shard is not None:
                    after_shard(v.name, k)
    progress.close()

    # Write: concatenate in a fixed order, then the stats, then _SUCCESS
    stats = _write_outputs(output, shards, variants, len(ranges), config, resumed=len(done))
    storage.delete_prefix(shards)
    log.info("wrote %d generations to %s", stats["generations"], storage.join(output, GENERATIONS))
    return storage.finish_stage(run, stats, declared=True)


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


def _engine_groups(variants: list[Variant], backend: str) -> list[list[Variant]]:
    """vLLM: variants on the same base model share one engine (adapters via LoRA). transformers: one each."""
    if backend != "vllm":
        return [[v] for v in variants]
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.model, []).append(v)
    return list(groups.values())


def _write_outputs(output: str, shards: str, variants: list[Variant], n_shards: int, config, resumed: int) -> dict:
    per_variant = {}
    total = 0
    with storage.open_write(storage.join(output, GENERATIONS), "wb") as out:
        for v in variants:
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
            total += counts["prompts"]
            per_variant[v.name] = {
                **counts,
                "model_path": v.model,
                "adapter_path": v.adapter,
                "generate_seconds": round(seconds, 3),
                "completion_tokens_per_s": round(timed_tokens / seconds, 2) if seconds > 0 else None,
                "mean_completion_tokens": round(counts["completion_tokens"] / max(1, counts["prompts"]), 2),
            }
    stats = {
        "backend": config.backend,
        "generations": total,
        "prompts": total // max(1, len(variants)),
        "variants": per_variant,
        "shards": n_shards * len(variants),
        "shards_resumed": resumed,
    }
    storage.write_json(storage.join(output, STATS), stats)
    return stats


# ---------------------------------------------------------------- backends


@contextlib.contextmanager
def open_backend(variants: list[Variant], config: GenerateConfig) -> Iterator[GenerateFn]:
    if config.backend == "vllm":
        with _open_vllm(variants, config) as fn:
            yield fn
    else:
        (variant,) = variants
        with _open_transformers(variant, config) as fn:
            yield fn


def end_of_turn_ids(tokenizer, eos_token_id: int | list[int] | None = None) -> list[int]:
    """Every token id that ends a reply: the model's eos id(s) and known end-of-turn tokens."""
    ids: set[int] = set()
    for value in (eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(i) for i in value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def reply_from_ids(new_ids: list[int], stop_ids, prompt_tokens: int, decode: Callable[[list[int]], str]) -> Reply:
    """Cut the generated ids at the first end-of-turn token; what comes after is padding."""
    for j, token in enumerate(new_ids):
        if token in stop_ids:
            return Reply(decode(new_ids[:j]).strip(), "stop", prompt_tokens, j + 1)
    return Reply(decode(new_ids).strip(), "length", prompt_tokens, len(new_ids))


def _torch_setup(config: GenerateConfig):
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype


@contextlib.contextmanager
def _open_transformers(variant: Variant, config: GenerateConfig) -> Iterator[GenerateFn]:
    import torch
    from transformers import GenerationConfig, set_seed

    from cmv_core import models

    device, dtype = _torch_setup(config)
    started = time.perf_counter()
    tokenizer = models.load_tokenizer(variant.model)
    tokenizer.padding_side = "left"  # decoder-only: new tokens follow the prompt directly
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = models.load_causal_lm(variant.model, dtype=dtype)
    if variant.adapter:
        from peft import PeftModel

        # Merged once at load: generation then runs at the plain model's speed.
        model = PeftModel.from_pretrained(model, storage.materialize_dir(variant.adapter)).merge_and_unload()
    model.to(device).eval()
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config.eos_token_id)
    sampling = config.temperature > 0
    # Every setting that shapes the output is explicit: generate() fills unset
    # ones from the model's generation_config.json (Llama 3.2 Instruct ships
    # temperature 0.6, top_p 0.9), which would make this backend differ from vLLM's.
    gen_config = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=sampling,
        temperature=config.temperature if sampling else None,
        top_p=config.top_p if sampling else None,
        top_k=0 if sampling else None,  # off, as in vLLM
        repetition_penalty=1.0,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    log.info(
        "%s: loaded %s on %s (%s) in %.1f s", variant.name, variant.model, device, dtype, time.perf_counter() - started
    )

    def generate(v: Variant, prompts: list[Prompt], seed: int) -> list[Reply]:
        texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
        # The template already holds the special tokens (BOS etc.): add none.
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        # Longest first: similar lengths share a batch, and an out-of-memory shows up at once.
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        replies: list[Reply | None] = [None] * len(prompts)
        for b, start in enumerate(range(0, len(order), config.batch_size)):
            idx = order[start : start + config.batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            set_seed(seed + b)
            with torch.inference_mode():
                out = model.generate(**batch.to(device), generation_config=gen_config)
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            for row, i in zip(new, idx):
                replies[i] = reply_from_ids(row, stop_ids, len(encoded[i]), _decoder(tokenizer))
        return replies

    try:
        yield generate
    finally:
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _decoder(tokenizer) -> Callable[[list[int]], str]:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- vLLM


def adapter_rank(adapter_dir: str) -> int:
    """The largest LoRA rank in a PEFT adapter_config.json (``r`` and any ``rank_pattern``)."""
    cfg = storage.read_json(storage.join(adapter_dir, "adapter_config.json"))
    ranks = [int(cfg.get("r") or 8), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise InputError(f"LoRA rank {rank} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def vllm_engine_kwargs(model_path: str, ranks: list[int], config: GenerateConfig) -> dict:
    """Arguments for ``vllm.LLM``: ours, then the recipe's ``vllm_engine_args`` as given."""
    reserved = sorted(set(config.vllm_engine_args) & set(VLLM_RESERVED_ENGINE_ARGS))
    if reserved:
        raise InputError(
            f"generate.vllm_engine_args: {', '.join(reserved)} is set by the stage "
            f"(use generate.tensor_parallel_size / generate.seed / the variants instead)"
        )
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": config.tensor_parallel_size,
        "seed": config.seed,
    }
    if ranks:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(max(ranks)), max_loras=len(ranks))
    kwargs.update(config.vllm_engine_args)
    return kwargs


def vllm_sampling_kwargs(config: GenerateConfig, n: int, seed: int, stop_ids: list[int]) -> list[dict]:
    """One ``SamplingParams`` per prompt; a seed per request makes sampling independent of batching."""
    return [
        {
            "n": 1,
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p if config.temperature > 0 else 1.0,
            "seed": seed + i,
            "stop_token_ids": list(stop_ids),
            "skip_special_tokens": True,
        }
        for i in range(n)
    ]


def reply_from_vllm(output) -> Reply:
    """A ``vllm.RequestOutput`` -> Reply."""
    completion = output.outputs[0]
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {output.request_id} ended with {completion.finish_reason!r}")
    return Reply(
        response=completion.text.strip(),
        finish_reason=completion.finish_reason,
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=len(completion.token_ids),
    )


@contextlib.contextmanager
def _open_vllm(variants: list[Variant], config: GenerateConfig) -> Iterator[GenerateFn]:
    import vllm
    from vllm.lora.request import LoRARequest

    from cmv_core import models

    known = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    unknown = sorted(set(config.vllm_engine_args) - known)
    if unknown:
        raise InputError(f"generate.vllm_engine_args: unknown vLLM engine argument(s) {', '.join(unknown)}")
    base = models.resolve_model(variants[0].model)
    lora: dict[str, LoRARequest] = {}
    for i, v in enumerate(x for x in variants if x.adapter):
        path = storage.materialize_dir(v.adapter)
        lora[v.name] = LoRARequest(lora_name=v.name, lora_int_id=i + 1, lora_path=path)
    ranks = [adapter_rank(r.lora_path) for r in lora.values()]
    started = time.perf_counter()
    llm = vllm.LLM(**vllm_engine_kwargs(base, ranks, config))
    log.info("vLLM engine for %s ready in %.1f s (LoRA: %s)", base, time.perf_counter() - started, list(lora) or "none")
    stop_ids = end_of_turn_ids(llm.get_tokenizer())

    def generate(v: Variant, prompts: list[Prompt], seed: int) -> list[Reply]:
        params = [vllm.SamplingParams(**kw) for kw in vllm_sampling_kwargs(config, len(prompts), seed, stop_ids)]
        outputs = llm.chat(
            [p.messages for p in prompts],
            sampling_params=params,
            use_tqdm=True,
            lora_request=lora.get(v.name),
            add_generation_prompt=True,
        )
        return [reply_from_vllm(o) for o in outputs]

    try:
        yield generate
    finally:
        # Free the GPU before the next engine (another base model) starts.
        import gc

        del llm
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
