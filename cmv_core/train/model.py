"""The model pieces every training method shares: weights dtype, loading, LoRA, merging an adapter."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from cmv_core.train.config import TrainConfig


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def weights_dtype(cfg: TrainConfig) -> str:
    """Load weights in bf16/fp16 when the adapters or DeepSpeed keep fp32 state; fp32 otherwise (AMP)."""
    if cfg.model_dtype != "auto":
        return cfg.model_dtype
    low = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.precision)
    if low and (cfg.method in ("lora", "qlora") or cfg.deepspeed):
        return low
    return "float32"


def load_model(model_path: str, cfg: TrainConfig):
    """The base causal LM (4-bit for QLoRA). Call after the SFTConfig exists (ZeRO-3 partitions at load)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(weights_dtype(cfg)), "attn_implementation": cfg.attn_implementation}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,  # storage dtype: ZeRO-3 compatible
        )
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # no KV cache while training
    return model


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path, dtype: str) -> None:
    """Base + LoRA -> plain weights (done on a fresh CPU copy of the base: works for ZeRO-3 and QLoRA runs)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)


@contextlib.contextmanager
def zero3_init_disabled():
    """Load models on this rank alone while ZeRO-3 is configured.

    With ZeRO-3 on, transformers wraps every from_pretrained/from_config in ``deepspeed.zero.Init``, which
    partitions the weights with collectives: on rank 0 alone (merging the adapter) that waits forever.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
