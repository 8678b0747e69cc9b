"""The generate stage's settings, artifact names and value types (a variant, a prompt, a reply)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from cmv_core import errors

GENERATIONS = "generations.jsonl"
STATS = "stats.json"
SHARDS = "shards"
PLAN = "_plan.json"
BACKENDS = ("transformers", "vllm")
FINETUNED_WEIGHTS = ("merged", "adapter")

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
    n: int = 1  # samples per prompt (n > 1 needs temperature > 0); rows then carry "sample" 0..n-1
    max_prompts: int | None = None  # only the first N test prompts (demo, smoke tests)
    shard_size: int = 64  # prompts per resumable shard
    batch_size: int = 8  # transformers: prompts per generate() call
    device: str = "auto"  # transformers: auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # transformers: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    # How a train stage output becomes the "finetuned" (and "dpo") variant: its merged model/ (a separate
    # model), or base model + its adapter/ (vLLM then serves base, fine-tuned and DPO from one engine
    # through LoRARequest). Unset: adapter on vllm, merged on transformers (finetuned_weights_for());
    # a full fine-tune has only model/ and is served merged either way.
    finetuned_weights: str | None = None
    tensor_parallel_size: int | None = None  # vllm; unset: every GPU this node has (1 without CUDA)
    max_model_len: int | None = None  # vllm: the engine's context (its KV cache is sized for it); unset: the model's
    vllm_engine_args: dict = field(default_factory=dict)  # passed to vllm.LLM as is, checked against vllm.EngineArgs
    # Filled from the command line (--model/--trained/--adapter/--variant);
    # a recipe may also list them: [{name, model, adapter}].
    variants: list = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # model spec: embedded:..., local dir, file://, s3://, or a Hub name
    adapter: str | None = None  # LoRA adapter dir/URI applied on top of ``model``
    # A LoRA adapter that ``adapter`` was trained on top of (DPO from the SFT model): both go on ``model`` as
    # one adapter of their summed rank (stacked.py), so vLLM serves it from the base model's engine.
    stacked_on: str | None = None


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


def finetuned_weights_for(config: GenerateConfig) -> str:
    """``finetuned_weights`` as set, else the backend's default: adapters on vLLM (one engine), merged otherwise."""
    if config.finetuned_weights is not None:
        return config.finetuned_weights
    return "adapter" if config.backend == "vllm" else "merged"


def check_config(config: GenerateConfig) -> list[Variant]:
    """Validate the config; the variants as objects."""
    if config.backend not in BACKENDS:
        raise InputError(f"generate.backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.finetuned_weights not in (None, *FINETUNED_WEIGHTS):
        raise InputError(f"generate.finetuned_weights must be one of {', '.join(FINETUNED_WEIGHTS)}")
    for key in ("max_new_tokens", "shard_size", "batch_size", "n", "tensor_parallel_size", "max_model_len"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise InputError(f"generate.{key} must be >= 1, got {value}")
    if config.temperature < 0 or not 0 < config.top_p <= 1:
        raise InputError("generate.temperature must be >= 0 and generate.top_p in (0, 1]")
    if config.n > 1 and config.temperature == 0:
        raise InputError(f"generate.n={config.n} samples per prompt need generate.temperature > 0 (greedy repeats one)")
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
