"""Train stage: supervised fine-tuning (SFT), and the pieces SFT and DPO (:mod:`cmv_core.train.dpo`) share.

TRL's ``SFTTrainer`` on ``train.jsonl`` / ``val.jsonl`` (conversational ``messages``), with:

- loss on the assistant turns only (the persuader's words). TRL builds that mask from ``{% generation %}``
  markers in the chat template; SmolLM2's and Llama 3.2's templates have none (TRL would fail, or with other
  templates silently train on nothing), so the stage swaps in a *training* template that renders
  byte-identically to the model's own (checked on the data) and has the markers. A template it cannot patch
  falls back to prompt/completion data (loss on the last assistant turn). Either way the stage then checks a
  real collated batch: the label mask must be non-empty and must not touch any prompt token, or it stops.
- LoRA (PEFT), full fine-tuning, or QLoRA (4-bit base; CUDA + bitsandbytes only);
- optional DeepSpeed ZeRO-2/ZeRO-3 (``configs/deepspeed/zero{2,3}.json``, every size ``"auto"`` so the
  recipe decides precision and batch sizes);
- checkpoints every ``save_steps`` mirrored to ``<output>/checkpoints/checkpoint-N/`` (S3 too), resumed after
  a kill, a final one on SIGTERM (exit 143, no ``_SUCCESS``): :mod:`cmv_core.train.checkpoints`. Chat templates and
  the label-mask check: :mod:`cmv_core.train.chat_template`.

Outputs (rank 0 only): ``model/`` (merged full weights + tokenizer; plain ``transformers``/vLLM load it),
``adapter/`` (LoRA/QLoRA), ``checkpoints/``, ``metrics.json``, ``loss.png``, then ``_SUCCESS``.

Launch
------
One process (CPU or one GPU)::

    cmv train --input <root>/<run>/format --output <root>/<run>/train --config configs/demo.yaml

Several processes / nodes: torchrun starts one process per GPU and each runs the same command. The
Kubernetes training Job (an Indexed Job, one pod per node) is expected to run, as the container's main
process (``exec``, so that it receives SIGTERM)::

    exec python3 -m cmv_core.train.torchrun \\
        --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$JOB_COMPLETION_INDEX" \\
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \\
        -m cmv_core.cli train --input s3://B/runs/R/format --output s3://B/runs/R/train \\
        --config configs/llama-3.2-1b.yaml --run-id R

with these environment variables:

- ``NNODES`` (= the Job's completions/parallelism), ``NPROC_PER_NODE`` (= GPUs per pod; 1 on CPU),
  ``JOB_COMPLETION_INDEX`` (set by Kubernetes; node rank), ``MASTER_ADDR`` (``<job>-0.<headless service>``),
  ``MASTER_PORT`` (e.g. 29500). torchrun then sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` for each process.
- ``AWS_ENDPOINT_URL``/``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (S3, from a Secret), ``HF_TOKEN`` for
  gated Hub weights (from a Secret), optionally ``CMV_CACHE`` (model cache) and ``CMV_SCRATCH`` (node-local
  scratch for checkpoints before upload; default the temp dir: give it an ``emptyDir`` big enough for two
  checkpoints).
- ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``: seconds torchrun waits for its workers after forwarding SIGTERM (default
  30) before SIGKILL; set it, and the pod's ``terminationGracePeriodSeconds`` above it, to more than one
  training step plus one checkpoint upload. Exit code 143 means "stopped on SIGTERM, checkpoint saved": count
  it as a disruption, not a failure, in the pod failure policy. (``cmv_core.train.torchrun`` is torchrun that keeps
  that status: plain torchrun exits 1 after forwarding SIGTERM, the same as on a crash.)

Every rank must see the same ``--output`` (S3 when there is more than one node); each node downloads the
resume checkpoint into its own scratch directory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmv_core import storage
from cmv_core.config import ConfigError
from cmv_core.errors import InputError
from cmv_core.train.chat_template import (
    check_label_mask,
    ensure_chat_template,
    renders_identically,
    training_chat_template,
)
from cmv_core.train.checkpoints import (
    EXIT_PREEMPTED,
    checkpoints_uri,
    fetch_resume_checkpoint,
    make_callbacks,
    scratch_dir,
)

log = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ROLES = ("system", "user", "assistant")


class TrainDataError(InputError):
    """The format stage's output is not usable for training (names file, line and reason)."""


# ---------------------------------------------------------------- config


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


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="the format stage's output (dir or URI with _SUCCESS)")
    parser.add_argument("--output", required=True, help="where model/, checkpoints/, metrics.json go (dir or s3://)")
    parser.add_argument(
        "--method",
        choices=("sft", "dpo"),
        default="sft",
        help="sft (the recipe's train: section) or dpo (its dpo: section over train:)",
    )
    parser.add_argument(
        "--init", help="dpo: the train output to start from (the SFT run), or 'base'; default: the recipe's dpo.init"
    )


def cli_main(args: argparse.Namespace) -> int:
    from cmv_core.config import load_recipe, model_spec, section

    recipe = load_recipe(args.config, args.set)
    if args.method == "dpo":
        from cmv_core.train.dpo import dpo_section

        cfg = dpo_section(recipe)
    else:
        cfg = section(recipe, "train", TrainConfig)
    if cfg.deepspeed:
        cfg.deepspeed = resolve_deepspeed_config(cfg.deepspeed, recipe.get("_source"))
    if args.method == "dpo":
        from cmv_core.train.dpo import run_dpo

        result = run_dpo(
            args.input,
            args.output,
            cfg,
            model_spec(recipe),
            init=args.init or cfg.init,
            run_id=args.run_id,
            force=args.force,
        )
    else:
        result = run_train(args.input, args.output, cfg, model_spec(recipe), run_id=args.run_id, force=args.force)
    if result is not None and result.get("preempted"):
        return EXIT_PREEMPTED
    return 0


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


# ---------------------------------------------------------------- data (pure)


def validate_example(row: Any, where: str) -> list[dict]:
    """The ``messages`` of one format-stage line, or a TrainDataError naming where and why."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise TrainDataError(f"{where}: expected an object with a non-empty 'messages' list")
    messages = []
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TrainDataError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: str}}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainDataError(f"{where}: no assistant turn, nothing to learn")
    if messages[-1]["role"] != "assistant":
        raise TrainDataError(f"{where}: the last turn must be the assistant's, got {messages[-1]['role']!r}")
    return messages


def load_split(uri: str, limit: int | None = None) -> list[list[dict]]:
    """Conversations of one split file (validated line by line)."""
    return load_validated(uri, validate_example, limit)


def load_validated(uri: str, validate: Callable[[Any, str], Any], limit: int | None = None) -> list:
    """``validate(row, "file:line")`` of each line of a JSONL file; a bad line is a TrainDataError naming it."""
    out: list = []
    try:
        for lineno, row in enumerate(storage.read_jsonl(uri), 1):
            out.append(validate(row, f"{uri}:{lineno}"))
            if limit is not None and len(out) >= limit:
                break
    except ValueError as exc:
        if isinstance(exc, TrainDataError):
            raise
        raise TrainDataError(str(exc)) from None
    return out


def to_prompt_completion(conversation: list[dict]) -> dict:
    """Fallback for templates without generation markers: train on the last assistant turn only."""
    return {"prompt": conversation[:-1], "completion": conversation[-1:]}


# ---------------------------------------------------------------- model pieces


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


def check_hardware(cfg: TrainConfig) -> None:
    """Fail before any work when the recipe asks for what this machine lacks."""
    import importlib.util

    import torch

    if cfg.method == "qlora" and (not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None):
        raise ConfigError("train.method=qlora needs a CUDA GPU and the bitsandbytes package; use lora on CPU")
    if cfg.precision != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={cfg.precision} needs a GPU here; use --set train.precision=fp32 on CPU")
    flash_module = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
    module = flash_module.get(cfg.attn_implementation)
    if module and (not torch.cuda.is_available() or importlib.util.find_spec(module) is None):
        raise ConfigError(
            f"train.attn_implementation={cfg.attn_implementation} needs a GPU and the {module} package; use sdpa"
        )


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


def start_cpu_deepspeed_state() -> None:
    """Process group for DeepSpeed on CPU (tests, laptops).

    accelerate only knows GPU backends for DeepSpeed: on CPU it lets DeepSpeed join a gloo group but records no
    backend and counts one process, so every gather in the Trainer breaks. Start its state with gloo instead;
    the SFTConfig then uses this state (``use_configured_state``).
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def trainer_arguments(cfg: TrainConfig, scratch: Path, *, has_eval: bool, count_padding: bool) -> dict:
    """The TrainingArguments every method shares (SFTConfig and DPOConfig both take them)."""
    import torch

    on_gpu = torch.cuda.is_available()
    configured_state = bool(cfg.deepspeed) and not on_gpu
    if configured_state:
        start_cpu_deepspeed_state()
    return dict(
        output_dir=str(scratch / "checkpoints"),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        tf32=cfg.tf32 if on_gpu else None,
        gradient_checkpointing=cfg.gradient_checkpointing,
        torch_compile=cfg.torch_compile,
        max_length=cfg.max_length,
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=bool(has_eval and cfg.eval_on_start),
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        deepspeed=deepspeed_dict(cfg.deepspeed) if cfg.deepspeed else None,
        # Packed batches carry no padding (and pad == eos for these tokenizers): count every token.
        include_num_input_tokens_seen="all" if count_padding else "non_padding",
        report_to="none",
        ddp_find_unused_parameters=False if cfg.method != "full" else None,
        save_only_model=False,
        disable_tqdm=not (int(os.environ.get("RANK", "0")) == 0),
        accelerator_config={"use_configured_state": True} if configured_state else None,
        # Without it, accelerate on CPU counts one process per node under torchrun --nnodes N, and every node
        # behaves as rank 0 (the multi-node Job test found this).
        use_cpu=not on_gpu and not configured_state,
    )


def sft_config(cfg: TrainConfig, scratch: Path, *, has_eval: bool):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(cfg, scratch, has_eval=has_eval, count_padding=cfg.packing),
        packing=cfg.packing,
        packing_strategy=cfg.packing_strategy,
        assistant_only_loss=True,
    )


# ---------------------------------------------------------------- outputs (rank 0)


def count_safetensors(directory: Path) -> tuple[int, int]:
    """(tensors, elements) in the safetensors files of a directory; a ZeRO-3 save gone wrong has 0-element ones."""
    from safetensors import safe_open

    tensors = elements = 0
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{directory}: no .safetensors file was written")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = math.prod(shape)
                if n == 0:
                    raise RuntimeError(f"{f.name}: tensor {key} is empty (shape {shape}); the save gathered nothing")
                tensors += 1
                elements += n
    return tensors, elements


def expected_parameters(model_dir: Path) -> int:
    """Parameters of the architecture in ``model_dir`` (built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights count once, as saved


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path, dtype: str) -> None:
    """Base + LoRA -> plain weights (done on a fresh CPU copy of the base: works for ZeRO-3 and QLoRA runs)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)


def write_loss_plot(history: list[dict], uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    margins = [(h["step"], h["rewards/margins"]) for h in history if "rewards/margins" in h]
    eval_margins = [(h["step"], h["eval_rewards/margins"]) for h in history if "eval_rewards/margins" in h]
    if margins:  # DPO: loss on the left, the reward margin (chosen - rejected) on the right
        fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        right.plot(*zip(*margins), label="train reward margin", marker="." if len(margins) < 50 else None)
        if eval_margins:
            right.plot(*zip(*eval_margins), label="eval reward margin (val)", marker="o", linestyle="--")
        right.axhline(0, color="grey", linewidth=0.8)
        right.set_xlabel("optimizer step")
        right.set_ylabel("reward margin (chosen - rejected)")
        right.grid(alpha=0.3)
        right.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss (val)", marker="o", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DPO loss" if margins else "loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version/date: stable bytes
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_allocated"}
    return {
        "peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "peak_memory_kind": "cpu_max_rss",
    }


TRAIN_LOG_KEYS = (
    "step",
    "loss",
    "learning_rate",
    "grad_norm",
    "num_tokens",
    "mean_token_accuracy",
    "num_input_tokens_seen",
)
# What DPOTrainer logs besides the loss (train; "eval_" + these on val)
PREFERENCE_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def build_metrics(state, throughput, *, final_eval: dict | None, extra: dict) -> dict:
    history = state.log_history
    train_loss = [{k: h[k] for k in TRAIN_LOG_KEYS + PREFERENCE_KEYS if k in h} for h in history if "loss" in h]
    # the final evaluate() repeats the last periodic eval when they fall on the same step: keep one per step
    eval_keys = ("eval_loss",) + tuple("eval_" + k for k in PREFERENCE_KEYS)
    eval_loss = list(
        {
            h["step"]: {"step": h["step"], **{k: h[k] for k in eval_keys if k in h}}
            for h in history
            if "eval_loss" in h
        }.values()
    )
    return {
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "final_eval_loss": (final_eval or {}).get("eval_loss"),
        "final_eval": {k: v for k, v in (final_eval or {}).items() if k in eval_keys},
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": throughput.tokens_per_second(),
        **peak_memory(),
        **extra,
    }


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


def _publish(
    trainer, cfg: TrainConfig, model_path: str, output: str, final_local: Path, scratch: Path, tokenizer
) -> dict:
    """Rank 0: check what save_model wrote, merge LoRA, upload adapter/ and model/."""
    with zero3_init_disabled():
        return _publish_local(cfg, model_path, output, final_local, scratch, tokenizer)


def _publish_local(cfg: TrainConfig, model_path: str, output: str, final_local: Path, scratch: Path, tokenizer) -> dict:
    for stale in ("model", "adapter"):  # a previous run's files must not survive into this manifest
        storage.delete_prefix(storage.join(output, stale))
    (final_local / "training_args.bin").unlink(missing_ok=True)  # a pickle of this run's args: not an artifact
    if cfg.method in ("lora", "qlora"):
        adapter_tensors, adapter_elements = count_safetensors(final_local)
        tokenizer.save_pretrained(final_local)
        storage.upload_dir(final_local, storage.join(output, "adapter"))
        merged = scratch / "merged"
        merge_adapter(
            model_path,
            final_local,
            merged,
            weights_dtype(cfg) if cfg.method == "lora" else ("bfloat16" if cfg.precision == "bf16" else "float16"),
        )
        model_dir = merged
    else:
        adapter_tensors = adapter_elements = 0
        model_dir = final_local
    tokenizer.save_pretrained(model_dir)
    tensors, elements = count_safetensors(model_dir)
    expected = expected_parameters(model_dir)
    if elements != expected:
        raise RuntimeError(f"model/ holds {elements} parameters, the architecture has {expected}: incomplete save")
    storage.upload_dir(model_dir, storage.join(output, "model"))
    return {
        "model_tensors": tensors,
        "model_parameters": elements,
        "adapter_tensors": adapter_tensors,
        "adapter_parameters": adapter_elements,
    }


# ---------------------------------------------------------------- steps every method's stage shares


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_launch(cfg: TrainConfig) -> None:
    """Fail early on missing hardware; give a plain single process the process group DeepSpeed wants."""
    check_hardware(cfg)
    if cfg.deepspeed and not cfg.deepspeed.endswith(".json"):
        cfg.deepspeed = resolve_deepspeed_config(cfg.deepspeed)
    if cfg.deepspeed and "WORLD_SIZE" not in os.environ:
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
            }
        )


def open_stage(
    output: str, inputs: list[str], stage_config: dict, scratch: Path, run_id: str | None, force: bool
) -> tuple[Any, str] | None:
    """(the stage run on rank 0 / None elsewhere, the run's fingerprint), or None when the output is up to date.

    Rank 0 decides and the others follow. Call after the trainer arguments exist (they start the process group).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    dist = PartialState()
    run = None
    decision: list[Any] = [None]
    if dist.is_main_process:
        had_success = storage.exists(storage.join(output, storage.SUCCESS))
        run = storage.begin_stage("train", output, inputs=inputs, config=stage_config, run_id=run_id, force=force)
        if run is None:
            decision[0] = {"skip": True}
        else:
            if had_success:  # a finished run's checkpoints must not be "resumed" by a forced or changed rerun
                storage.delete_prefix(checkpoints_uri(output))
            fingerprint = hashlib.sha256(
                json.dumps({"inputs": run.inputs, "config": run.config}, sort_keys=True).encode()
            ).hexdigest()
            decision[0] = {"skip": False, "fingerprint": fingerprint}
    if dist.num_processes > 1:
        broadcast_object_list(decision)
    if decision[0]["skip"]:
        return None
    if dist.is_local_main_process:
        shutil.rmtree(scratch, ignore_errors=True)  # a killed run's leftovers on this node
    dist.wait_for_everyone()
    return run, decision[0]["fingerprint"]


def stage_config_of(cfg: TrainConfig, model: str, **extra) -> dict:
    """What the manifest records (and the checkpoint fingerprint covers): DeepSpeed by content, not by path,
    so the same run in another checkout or image matches its manifest and resumes its checkpoints."""
    from cmv_core.config import to_dict

    return {
        "train": {**to_dict(cfg), "deepspeed": deepspeed_dict(cfg.deepspeed) if cfg.deepspeed else None},
        "model": model,
        **extra,
    }


def train_resumably(trainer, output: str, fingerprint: str, cfg: TrainConfig, stopper, scratch: Path) -> dict:
    """Train from the newest complete checkpoint at the output (if any); then the final eval.

    Returns ``resumed_from_step``, ``stopped_at`` (SIGTERM step or None), ``final_eval``, ``train_runtime_s``,
    ``trainable_parameters`` and ``parameters``.
    """
    from accelerate import PartialState

    world_size = PartialState().num_processes
    found = fetch_resume_checkpoint(
        output, fingerprint, world_size, bool(cfg.deepspeed), scratch, Path(trainer.args.output_dir)
    )
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions at load)
    trainable = sum(numel(p) for p in trainer.model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in trainer.model.parameters())
    started = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=str(found[1]) if found else None)
    finally:
        stopper.restore()
    result = {
        "resumed_from_step": found[0] if found else None,
        "stopped_at": stopper.stopped_at,
        "final_eval": None,
        "trainable_parameters": trainable,
        "parameters": total,
    }
    if stopper.stopped_at is None:
        last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last_eval is not None and last_eval["step"] == trainer.state.global_step:
            result["final_eval"] = last_eval  # the periodic eval just ran on this very step
        elif trainer.eval_dataset is not None:
            result["final_eval"] = trainer.evaluate()
    result["train_runtime_s"] = round(time.monotonic() - started, 2)
    return result


def preempted(trained: dict, output: str) -> dict:
    log.warning(
        "stopped on SIGTERM at step %d; checkpoint mirrored to %s; exiting %d so the Job resumes",
        trained["stopped_at"],
        checkpoints_uri(output),
        EXIT_PREEMPTED,
    )
    return {"preempted": True, "step": trained["stopped_at"], "resumed_from_step": trained["resumed_from_step"]}


def save_outputs(
    trainer,
    cfg: TrainConfig,
    run,
    base_model_path: str,
    output: str,
    scratch: Path,
    tokenizer,
    throughput,
    trained: dict,
    extra: dict,
) -> dict:
    """Gather the weights from every rank (ZeRO-3 safe); rank 0 merges, checks, uploads model/ adapter/
    metrics.json loss.png, then ``_SUCCESS``. ``base_model_path``: the weights the adapter was trained on."""
    from accelerate import PartialState

    dist = PartialState()
    final_local = scratch / "final"
    trainer.save_model(str(final_local))
    summary: dict[str, Any] = {}
    if dist.is_main_process:
        summary = _publish(trainer, cfg, base_model_path, output, final_local, scratch, tokenizer)
        metrics = build_metrics(
            trainer.state,
            throughput,
            final_eval=trained["final_eval"],
            extra={
                "resumed_from_step": trained["resumed_from_step"],
                "train_runtime_s": trained["train_runtime_s"],
                "world_size": dist.num_processes,
                "method": cfg.method,
                "deepspeed": Path(cfg.deepspeed).name if cfg.deepspeed else None,
                "precision": cfg.precision,
                "trainable_parameters": trained["trainable_parameters"],
                "parameters": trained["parameters"],
                **extra,
            },
        )
        storage.write_json(storage.join(output, "metrics.json"), metrics)
        write_loss_plot(trainer.state.log_history, storage.join(output, "loss.png"))
        if not cfg.keep_checkpoints:
            storage.delete_prefix(checkpoints_uri(output))
        summary.update(
            {
                k: metrics[k]
                for k in ("global_step", "final_eval_loss", "tokens_seen", "tokens_per_second", "resumed_from_step")
            }
        )
        storage.finish_stage(run, summary, declared=True)
        log.info(
            "train: %d steps, final eval loss %s, %s tokens/s; wrote %s",
            metrics["global_step"],
            metrics["final_eval_loss"],
            metrics["tokens_per_second"],
            output,
        )
    dist.wait_for_everyone()
    if dist.is_local_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


# ---------------------------------------------------------------- the SFT stage


def run_train(
    input: str,
    output: str,
    config: TrainConfig,
    model: str,
    run_id: str | None = None,
    force: bool = False,
) -> dict | None:
    """Fine-tune ``model`` on the format output at ``input``; write model/, metrics, checkpoints to ``output``.

    Returns the manifest summary (rank 0; other ranks get the same dict without files), ``None`` when skipped,
    or ``{"preempted": True, ...}`` when SIGTERM stopped training after a checkpoint (no ``_SUCCESS``).
    """
    from accelerate import PartialState
    from datasets import Dataset
    from trl import SFTTrainer

    from cmv_core.models import load_tokenizer, resolve_model

    # Load: launch, skip decision (rank 0), conversations, tokenizer
    cfg = config
    prepare_launch(cfg)
    scratch = scratch_dir(output)
    args = sft_config(cfg, scratch, has_eval=True)  # initializes the process group
    opened = open_stage(output, [input], stage_config_of(cfg, model), scratch, run_id, force)
    if opened is None:
        return None
    run, fingerprint = opened
    train_rows = load_split(storage.join(input, "train.jsonl"), cfg.max_train_examples)
    val_rows = load_split(storage.join(input, "val.jsonl"), cfg.max_eval_examples)
    if not train_rows:
        raise TrainDataError(f"{storage.join(input, 'train.jsonl')}: no examples")
    log.info("train: %d conversations, val: %d (from %s)", len(train_rows), len(val_rows), input)
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path)

    # Data: a training template with generation markers (loss on every assistant turn), or prompt/completion
    shipped_template = ensure_chat_template(tokenizer)
    training_template = training_chat_template(tokenizer)
    if training_template and renders_identically(tokenizer, shipped_template, training_template, train_rows[:16]):
        tokenizer.chat_template = training_template
        loss_masking = "assistant_turns"
        to_row = lambda conv: {"messages": conv}  # noqa: E731
    else:
        log.warning(
            "no chat template with generation markers renders like this model's own: training on the "
            "last assistant turn of each conversation only (prompt/completion data)"
        )
        loss_masking = "last_assistant_turn"
        args.assistant_only_loss, args.completion_only_loss = False, True
        to_row = to_prompt_completion
    train_ds = Dataset.from_list([to_row(c) for c in train_rows])
    eval_ds = Dataset.from_list([to_row(c) for c in val_rows]) if val_rows else None
    if eval_ds is None:
        args.eval_strategy, args.eval_on_start = "no", False

    # Train: the trainer, the loss mask checked on a real collated batch, then train (resuming if it can)
    mirror, stopper, throughput = make_callbacks(
        output, fingerprint, cfg.save_total_limit, PartialState().num_processes
    )
    trainer = SFTTrainer(
        model=load_model(model_path, cfg),
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if cfg.method in ("lora", "qlora") else None,
        callbacks=[mirror, stopper, throughput],
    )
    if len(trainer.train_dataset) == 0:
        raise TrainDataError(
            f"{storage.join(input, 'train.jsonl')}: every example lost its assistant turn to "
            f"truncation at train.max_length={cfg.max_length}; raise it or lower format.max_tokens"
        )
    if not cfg.packing and len(trainer.train_dataset) < len(train_ds):
        log.warning(
            "%d of %d training examples dropped: their reply starts after train.max_length=%d tokens",
            len(train_ds) - len(trainer.train_dataset),
            len(train_ds),
            cfg.max_length,
        )
    n_check = min(cfg.label_check_examples, len(trainer.train_dataset))  # first rows: no sampler RNG consumed
    mask_stats = check_label_mask(trainer.data_collator([trainer.train_dataset[i] for i in range(n_check)]), tokenizer)
    log.info(
        "label mask OK: %d of %d tokens trained (%.1f%%), masking=%s",
        mask_stats["trained_tokens"],
        mask_stats["tokens"],
        100 * mask_stats["trained_fraction"],
        loss_masking,
    )
    trained = train_resumably(trainer, output, fingerprint, cfg, stopper, scratch)
    if trained["stopped_at"] is not None:
        return preempted(trained, output)

    # Save: ship the model's own template (renders the same), merged model/, adapter/, metrics, _SUCCESS
    tokenizer.chat_template = shipped_template
    return save_outputs(
        trainer,
        cfg,
        run,
        model_path,
        output,
        scratch,
        tokenizer,
        throughput,
        trained,
        extra={
            "packing": cfg.packing,
            "loss_masking": loss_masking,
            "label_mask": mask_stats,
            "train_examples": len(train_rows),
            "val_examples": len(val_rows),
            "model": model,
        },
    )
