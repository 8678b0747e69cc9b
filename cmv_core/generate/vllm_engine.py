"""The vLLM backend (the GPU generate image, or vLLM's CPU build in .venv-engines; imported lazily):
``LLM.chat`` over a whole shard.

LoRA adapters go through ``LoRARequest``, so base, fine-tuned and DPO variants on the same base model share
one engine (a DPO adapter trained on the SFT model arrives stacked on the SFT adapter: stacked.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from cmv_core import models, storage
from cmv_core.generate.config import GenerateConfig, GenerateFn, InputError, Prompt, Reply, Variant
from cmv_core.generate.stop_tokens import end_of_turn_ids

log = logging.getLogger(__name__)

# vLLM accepts only these values for ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Engine arguments this module sets itself; set them through the generate section, not vllm_engine_args.
VLLM_RESERVED_ENGINE_ARGS = ("model", "tokenizer", "tensor_parallel_size", "seed", "enable_lora")


def node_gpus() -> int:
    """CUDA devices this process sees (1 without any: vLLM's CPU build takes tensor_parallel_size 1)."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def check_engine_args(engine_args: dict, known: set[str]) -> None:
    """Every recipe engine argument must be a field of ``vllm.EngineArgs`` (a typo would be ignored otherwise)."""
    unknown = sorted(set(engine_args) - known)
    if unknown:
        raise InputError(
            f"generate.vllm_engine_args: unknown vLLM engine argument(s) {', '.join(unknown)} "
            f"(not fields of vllm.EngineArgs in this vLLM)"
        )


def lora_int_id(path: str) -> int:
    """A LoRARequest id from the adapter's path: vLLM caches adapters by id, so one id must mean one adapter."""
    return 1 + int(hashlib.sha256(path.encode()).hexdigest()[:7], 16)


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
        "tensor_parallel_size": config.tensor_parallel_size or node_gpus(),
        "seed": config.seed,
    }
    if config.max_model_len:
        if "max_model_len" in config.vllm_engine_args:
            raise InputError("generate.max_model_len and generate.vllm_engine_args.max_model_len: set one")
        kwargs["max_model_len"] = config.max_model_len
    if ranks:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(max(ranks)), max_loras=len(ranks))
    kwargs.update(config.vllm_engine_args)
    return kwargs


def vllm_sampling_kwargs(config: GenerateConfig, n: int, seed: int, stop_ids: list[int]) -> list[dict]:
    """One ``SamplingParams`` per prompt; a seed per request makes sampling independent of batching."""
    return [
        {
            "n": config.n,
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
    """A ``vllm.RequestOutput`` -> Reply (its first completion)."""
    return replies_from_vllm(output)[0]


def replies_from_vllm(output) -> list[Reply]:
    """A ``vllm.RequestOutput`` -> one Reply per completion (``n`` of them), in vLLM's order."""
    replies = []
    for completion in output.outputs:
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request {output.request_id} ended with {completion.finish_reason!r}")
        replies.append(
            Reply(
                response=completion.text.strip(),
                finish_reason=completion.finish_reason,
                prompt_tokens=len(output.prompt_token_ids),
                completion_tokens=len(completion.token_ids),
            )
        )
    return replies


def _lora_requests(variants: list[Variant]) -> dict:
    """A ``LoRARequest`` per variant with an adapter, by variant name."""
    from vllm.lora.request import LoRARequest

    lora: dict[str, LoRARequest] = {}
    for v in (x for x in variants if x.adapter):
        path = storage.materialize_dir(v.adapter)
        lora[v.name] = LoRARequest(lora_name=v.name, lora_int_id=lora_int_id(path), lora_path=path)
    return lora


def start_engine(kwargs: dict):
    """``vllm.LLM(**kwargs)`` (the engines tests share one per session by replacing this function)."""
    import vllm

    return vllm.LLM(**kwargs)


@contextlib.contextmanager
def open_vllm(variants: list[Variant], config: GenerateConfig) -> Iterator[GenerateFn]:
    """The group's generate function; ``generate.engine`` says backend, vLLM version, start seconds, LoRA."""
    import vllm

    check_engine_args(config.vllm_engine_args, {f.name for f in dataclasses.fields(vllm.EngineArgs)})
    base = models.resolve_model(variants[0].model)
    lora = _lora_requests(variants)
    ranks = [adapter_rank(r.lora_path) for r in lora.values()]
    started = time.perf_counter()
    kwargs = vllm_engine_kwargs(base, ranks, config)
    llm = start_engine(kwargs)
    start_s = time.perf_counter() - started
    log.info("vLLM %s engine for %s ready in %.1f s (LoRA: %s)", vllm.__version__, base, start_s, list(lora) or "none")
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
        return [r for o in outputs for r in replies_from_vllm(o)]

    generate.engine = {
        "backend": "vllm",
        "version": vllm.__version__,
        "model": base,
        "variants": [v.name for v in variants],
        "lora_adapters": list(lora),
        "tensor_parallel_size": kwargs["tensor_parallel_size"],
        "start_seconds": round(start_s, 1),
    }
    try:
        yield generate
    finally:
        # Free the GPU before the next engine (another base model) starts. Rebinding
        # clears the name generate() closes over too (not del: ruff reads a deleted
        # closed-over name as undefined, F821).
        llm = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
