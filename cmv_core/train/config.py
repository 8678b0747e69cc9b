"""Train stage settings: the recipe's ``train:`` section (also read under ``dpo:``), the DeepSpeed config it names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmv_core import storage
from cmv_core.config import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ROLES = ("system", "user", "assistant")


@dataclass
class TrainConfig:
    """The recipe's ``train:`` section (every key is optional)."""

    method: str = "lora"  # lora | full | qlora (qlora: CUDA + bitsandbytes only)
    # Steps: max_steps > 0 wins over num_train_epochs.
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # < 1: fraction of the total steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Sequences
    max_length: int = 1024
    packing: bool = False
    packing_strategy: str = "bfd"  # bfd (no cross-example attention) | wrapped (plain causal; fastest kernels)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # Numerics and kernels
    precision: str = "fp32"  # fp32 | bf16 | fp16
    model_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 weights for LoRA/DeepSpeed + bf16)
    # sdpa | eager | flash_attention_2 (needs flash-attn) | flex_attention. With bfd packing the batch is one
    # padding-free row: flash-attn (and flex) attend within each example only; sdpa needs a dense block mask.
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    tf32: bool = True  # TensorFloat-32 matmuls on Ampere+ GPUs (ignored on CPU)
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    # DeepSpeed: null | zero2 | zero3 | a path to a JSON config
    deepspeed: str | None = None
    # Evaluation, logging, checkpoints
    eval_steps: int | None = None  # None: evaluate once at the end
    eval_on_start: bool = False
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2  # complete checkpoints kept at the output URI (and locally)
    keep_checkpoints: bool = True  # keep checkpoints/ in the final output (False: delete them on success)
    seed: int = 42
    dataloader_num_workers: int = 0
    label_check_examples: int = 8  # examples in the collated batch whose label mask is verified
    # DPO only: the recipe's dpo: section, read over train: (cmv_core.train.dpo.dpo_section); packing is not used
    enabled: bool = True  # dpo: whether `cmv run` runs DPO after SFT
    init: str = (
        "train"  # dpo: start from "train" (this run's SFT output), "base" (the recipe's model), or a train output URI
    )
    dpo_args: dict | None = (
        None  # dpo: passed to TRL's DPOConfig as they are (beta, loss_type, ...); TRL's defaults otherwise
    )

    def __post_init__(self) -> None:
        # YAML reads "2e-4" (no dot) as a string: accept it for the float settings
        for key in (
            "learning_rate",
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "num_train_epochs",
            "lora_dropout",
        ):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    setattr(self, key, float(value))
                except ValueError:
                    raise ConfigError(f"train.{key}: expected a number, got {value!r}") from None
        choices = {
            "method": ("lora", "full", "qlora"),
            "precision": ("fp32", "bf16", "fp16"),
            "model_dtype": ("auto", "float32", "bfloat16", "float16"),
            "packing_strategy": ("bfd", "bfd_split", "wrapped"),
            "attn_implementation": ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"train.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError("train: set max_steps > 0 or num_train_epochs > 0")
        if self.save_steps <= 0 or self.logging_steps <= 0 or self.max_length <= 0:
            raise ConfigError("train.save_steps, train.logging_steps and train.max_length must be positive")
        if self.save_total_limit < 1:
            raise ConfigError("train.save_total_limit must be at least 1 (the newest checkpoint is needed to resume)")


def resolve_deepspeed_config(value: str, recipe_source: str | None = None) -> str:
    """``zero2``/``zero3`` -> the shipped JSON next to the recipe (or in the repo); a path stays a path."""
    if value.endswith(".json"):
        path = Path(value)
        if not path.is_absolute() and recipe_source and not storage.is_s3(recipe_source):
            beside = storage.local_path(recipe_source).parent / value
            if beside.exists():
                return str(beside.resolve())
        if not path.exists():
            raise ConfigError(f"train.deepspeed: {value} does not exist")
        return str(path.resolve())
    candidates = []
    if recipe_source and not storage.is_s3(recipe_source):
        candidates.append(storage.local_path(recipe_source).parent / "deepspeed" / f"{value}.json")
    candidates.append(REPO_CONFIGS / "deepspeed" / f"{value}.json")
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    raise ConfigError(f"train.deepspeed: no config named {value!r} (looked in {', '.join(map(str, candidates))})")


def deepspeed_dict(path: str) -> dict:
    """The DeepSpeed JSON, minus an "auto" train_batch_size.

    transformers fills "auto" while the TrainingArguments are built, before the process group exists, so it
    computes the global batch with a world size of 1 and DeepSpeed then rejects it on every multi-process run.
    Without the key DeepSpeed derives it itself (micro batch x accumulation x world size).
    """
    ds = json.loads(Path(path).read_text())
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    return ds
