"""A training run's outputs (rank 0 writes them): ``model/``, ``adapter/``, ``metrics.json``, ``loss.png``,
then ``_SUCCESS``; the weights are checked complete before they are uploaded."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from cmv_core import storage
from cmv_core.train.checkpoints import checkpoints_uri
from cmv_core.train.config import TrainConfig
from cmv_core.train.metrics import build_metrics, write_loss_plot
from cmv_core.train.model import merge_adapter, weights_dtype, zero3_init_disabled

log = logging.getLogger(__name__)


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
