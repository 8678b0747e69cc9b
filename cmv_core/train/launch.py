"""How the train stage is launched, and what each process does before the trainer exists.

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

import os
import socket
from pathlib import Path

from cmv_core.config import ConfigError
from cmv_core.train.config import TrainConfig, deepspeed_dict, resolve_deepspeed_config


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
