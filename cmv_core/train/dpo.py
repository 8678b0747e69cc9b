"""Train stage, DPO: preference optimisation on CMV's delta-winning vs matched losing replies, after SFT.

TRL's ``DPOTrainer`` on the format stage's ``train_preferences.jsonl`` / ``val_preferences.jsonl`` (TRL's
conversational preference format: ``prompt`` messages, one ``chosen`` and one ``rejected`` assistant message,
plus ``thread_id`` and metadata), starting from an earlier train output (the SFT model: its merged
``model/``) or from the base model.

- The recipe's ``dpo:`` section, read over its ``train:`` section (so precision, DeepSpeed, LoRA settings are
  shared and the DPO section says only what differs); ``dpo.dpo_args`` go to TRL's ``DPOConfig`` as they are
  (``beta``, ``loss_type``, ...): what the recipe does not say stays TRL's default.
- LoRA (default) trains a new adapter on the init model; the reference model is the same weights with the
  adapter disabled (TRL does this when ``ref_model`` is None and the model is a PEFT model), so there is one
  copy of the base weights in memory (``metrics.json`` records the count). ``method: full`` loads a second,
  frozen copy as the reference.
- Loss on the completion tokens only: TRL's ``completion_mask`` marks the chosen and rejected replies; the stage
  checks it on a real collated batch (never a prompt token) before training.
- Checkpoints, resume after SIGKILL/SIGTERM, DeepSpeed, torchrun, rank-0-only outputs: as SFT
  (:mod:`cmv_core.train.checkpoints`, the shared steps in :mod:`cmv_core.train.resumable` and
  :mod:`cmv_core.train.outputs`).

Outputs: ``model/`` (init model + DPO adapter, merged), ``adapter/`` (LoRA, on the init model),
``metrics.json`` (loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies per step and on
val), ``loss.png`` (loss and margin curves), ``checkpoints/``, then ``_SUCCESS`` whose inputs include the init
train output's manifest digest, and whose ``config.model`` is the init model (where the adapter goes).

Run (after SFT wrote ``<run>/train``)::

    cmv train --method dpo --input <run>/format --init <run>/train --output <run>/dpo --config configs/demo.yaml
"""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path

from cmv_core import stages, storage
from cmv_core.config import ConfigError, section
from cmv_core.train.chat_template import check_completion_mask, ensure_chat_template
from cmv_core.train.checkpoints import make_callbacks, scratch_dir
from cmv_core.train.config import TrainConfig
from cmv_core.train.data import TrainDataError, load_preferences
from cmv_core.train.launch import prepare_launch, trainer_arguments
from cmv_core.train.model import load_model, lora_config
from cmv_core.train.outputs import save_outputs
from cmv_core.train.resumable import open_stage, preempted, stage_config_of, train_resumably

log = logging.getLogger(__name__)

TRAIN_FILE = "train_preferences.jsonl"
VAL_FILE = "val_preferences.jsonl"


# ---------------------------------------------------------------- config


def dpo_section(recipe: dict) -> TrainConfig:
    """The recipe's ``dpo:`` section over its ``train:`` section (dpo wins), as a TrainConfig."""
    if not isinstance(recipe.get("dpo"), dict):
        raise ConfigError(f"{recipe.get('_source', '<overrides>')}: no dpo: section (needed for --method dpo)")
    return section({**recipe, "dpo": stages.dpo_over_train(recipe)}, "dpo", TrainConfig)


def dpo_config(cfg: TrainConfig, scratch: Path, *, has_eval: bool):
    from trl import DPOConfig

    common = trainer_arguments(cfg, scratch, has_eval=has_eval, count_padding=False)
    extra = dict(cfg.dpo_args or {})
    clash = sorted(set(extra) & set(common))
    if clash:
        raise ConfigError(f"dpo.dpo_args: {', '.join(clash)} are dpo: keys of their own; set them there")
    try:
        return DPOConfig(**common, **extra)
    except TypeError as exc:
        raise ConfigError(f"dpo.dpo_args: {exc} (see trl.DPOConfig)") from None


# ---------------------------------------------------------------- steps of the DPO stage


def dpo_stage_config(cfg: TrainConfig, model: str, init: str) -> dict:
    """What the manifest records. ``model`` there is the weights adapter/ goes on (generate reads it): the init
    train output's model/, or the base model."""
    init_spec = model if init == "base" else storage.join(init, "model")
    return stage_config_of(cfg, init_spec, method="dpo", init=init, base_model=model)


def load_pairs(input: str, cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) preference pairs of the format output; no training pair is an error."""
    train_rows = load_preferences(storage.join(input, TRAIN_FILE), cfg.max_train_examples)
    val_rows = load_preferences(storage.join(input, VAL_FILE), cfg.max_eval_examples)
    if not train_rows:
        raise TrainDataError(f"{storage.join(input, TRAIN_FILE)}: no preference pairs")
    return train_rows, val_rows


def init_copy_dir(scratch: Path) -> Path:
    """Where this node keeps its copy of an S3 init model (beside the scratch directory, which resume clears)."""
    return scratch.parent / f"{scratch.name}-init"


def init_model(init: str, model: str, scratch: Path) -> str:
    """A local path to the weights DPO starts from: the base model, or a train output's merged model/."""
    from accelerate import PartialState

    from cmv_core.models import resolve_model

    if init == "base":
        return resolve_model(model)
    uri = storage.join(init, "model")
    if not storage.is_s3(uri):
        return str(storage.local_path(uri))
    local = init_copy_dir(scratch)
    dist = PartialState()
    if dist.is_local_main_process:
        shutil.rmtree(local, ignore_errors=True)
        storage.download_dir(uri, local)
    dist.wait_for_everyone()
    return str(local)


def base_weight_copies() -> int:
    """Causal-LM models alive in this process (a PEFT wrapper and the model it wraps count once)."""
    import warnings

    from transformers import PreTrainedModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some module objects trips deprecation shims
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, PreTrainedModel) and hasattr(o, "lm_head"))


def dpo_trainer(init_path: str, cfg: TrainConfig, args, train_ds, eval_ds, tokenizer, callbacks: list):
    """TRL's DPOTrainer on the init model. LoRA: ``ref_model=None`` makes the reference the same weights with the
    adapter disabled (no second copy); full: TRL loads a frozen copy as the reference."""
    from trl import DPOTrainer

    return DPOTrainer(
        model=load_model(init_path, cfg),
        ref_model=None,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if cfg.method == "lora" else None,
        callbacks=callbacks,
    )


def reference_weight_copies(trainer) -> int:
    """Which reference the trainer uses and how many copies of the weights are in memory (logged); the copies."""
    copies = base_weight_copies()
    log.info(
        "dpo: reference = %s; %d copy(ies) of the weights in memory",
        "init weights, adapter disabled" if trainer.ref_model is None else "a frozen copy",
        copies,
    )
    return copies


def pairs_dropped(given: int, kept: int, uri: str, cfg: TrainConfig) -> int:
    """TRL drops the pairs whose prompt alone fills max_length: count them, refuse when none is left."""
    if kept == 0:
        raise TrainDataError(f"{uri}: every pair's prompt is over dpo.max_length={cfg.max_length} tokens; raise it")
    if kept < given:
        log.warning(
            "%d of %d pairs dropped: their prompt alone is over dpo.max_length=%d tokens",
            given - kept,
            given,
            cfg.max_length,
        )
    return given - kept


def checked_completion_mask(trainer, tokenizer, cfg: TrainConfig) -> dict:
    """:func:`check_completion_mask` on the first collated training pairs; its counts."""
    n_check = min(cfg.label_check_examples, len(trainer.train_dataset))
    mask_stats = check_completion_mask(
        trainer.data_collator([trainer.train_dataset[i] for i in range(n_check)]), tokenizer
    )
    log.info(
        "completion mask OK: %d of %d tokens trained (%.1f%%)",
        mask_stats["trained_tokens"],
        mask_stats["tokens"],
        100 * mask_stats["trained_fraction"],
    )
    return mask_stats


# ---------------------------------------------------------------- the stage


def run_dpo(
    input: str,
    output: str,
    config: TrainConfig,
    model: str,
    init: str,
    run_id: str | None = None,
    force: bool = False,
) -> dict | None:
    """DPO from ``init`` (a train output URI, or "base" for ``model``) on the preference pairs at ``input``.

    Returns like :func:`cmv_core.train.sft.run_train`.
    """
    from accelerate import PartialState
    from datasets import Dataset

    from cmv_core.models import load_tokenizer

    # Load: launch, skip decision (rank 0; the init model's manifest is an input), pairs, init model, tokenizer
    cfg = config
    if cfg.method == "qlora":
        raise ConfigError("dpo.method: lora or full (QLoRA DPO is not wired)")
    prepare_launch(cfg)
    scratch = scratch_dir(output)
    args = dpo_config(cfg, scratch, has_eval=True)  # initializes the process group
    if init == "train":
        raise ConfigError("dpo.init=train: pass the SFT train output with --init (cmv run does)")
    inputs = [input] + ([] if init == "base" else [init])
    opened = open_stage(output, inputs, dpo_stage_config(cfg, model, init), scratch, run_id, force)
    if opened is None:
        return None
    run, fingerprint = opened
    train_rows, val_rows = load_pairs(input, cfg)
    log.info("dpo: %d train pairs, %d val pairs (from %s), init %s", len(train_rows), len(val_rows), input, init)
    init_path = init_model(init, model, scratch)
    tokenizer = load_tokenizer(init_path)
    ensure_chat_template(tokenizer)

    # Data: conversational preference rows (TRL applies the chat template and splits prompt / completion)
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(val_rows) if val_rows else None
    if eval_ds is None:
        args.eval_strategy, args.eval_on_start = "no", False

    # Train: LoRA -> the reference is the init weights with the adapter disabled (ref_model=None, no copy)
    mirror, stopper, throughput = make_callbacks(
        output, fingerprint, cfg.save_total_limit, PartialState().num_processes
    )
    trainer = dpo_trainer(init_path, cfg, args, train_ds, eval_ds, tokenizer, [mirror, stopper, throughput])
    dropped = pairs_dropped(len(train_ds), len(trainer.train_dataset), storage.join(input, TRAIN_FILE), cfg)
    copies = reference_weight_copies(trainer)
    mask_stats = checked_completion_mask(trainer, tokenizer, cfg)
    trained = train_resumably(trainer, output, fingerprint, cfg, stopper, scratch)
    if trained["stopped_at"] is not None:
        return preempted(trained, output)

    # Save: merged model/ (init + adapter), adapter/, metrics with the reward curves, _SUCCESS
    extra = {
        "objective": "dpo",
        "init": init,
        "reference_model": "adapter_disabled" if trainer.ref_model is None else "frozen_copy",
        "base_weight_copies": copies,
        "label_mask": mask_stats,
        "dpo_args": dict(cfg.dpo_args or {}),
        "beta": args.beta,
        "loss_type": list(args.loss_type),
        "train_examples": len(train_rows),
        "pairs_dropped_prompt_too_long": dropped,
        "val_examples": len(val_rows),
        "model": model,
    }
    summary = save_outputs(trainer, cfg, run, init_path, output, scratch, tokenizer, throughput, trained, extra=extra)
    if PartialState().is_local_main_process:
        shutil.rmtree(init_copy_dir(scratch), ignore_errors=True)  # an S3 init model's copy
    return summary
