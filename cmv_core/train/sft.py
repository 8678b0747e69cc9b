"""Train stage: supervised fine-tuning (SFT). DPO (:mod:`cmv_core.train.dpo`) shares its steps.

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
  the label-mask check: :mod:`cmv_core.train.chat_template`. How to launch it (one process, torchrun, the
  Kubernetes Job): :mod:`cmv_core.train.launch`.

Outputs (rank 0 only): ``model/`` (merged full weights + tokenizer; plain ``transformers``/vLLM load it),
``adapter/`` (LoRA/QLoRA), ``checkpoints/``, ``metrics.json``, ``loss.png``, then ``_SUCCESS``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cmv_core import storage
from cmv_core.train.chat_template import (
    check_label_mask,
    ensure_chat_template,
    renders_identically,
    training_chat_template,
)
from cmv_core.train.checkpoints import make_callbacks, scratch_dir
from cmv_core.train.config import TrainConfig
from cmv_core.train.data import TrainDataError, load_split, to_prompt_completion
from cmv_core.train.launch import prepare_launch, trainer_arguments
from cmv_core.train.model import load_model, lora_config
from cmv_core.train.outputs import save_outputs
from cmv_core.train.resumable import open_stage, preempted, stage_config_of, train_resumably

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- steps of the SFT stage


def sft_config(cfg: TrainConfig, scratch: Path, *, has_eval: bool):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(cfg, scratch, has_eval=has_eval, count_padding=cfg.packing),
        packing=cfg.packing,
        packing_strategy=cfg.packing_strategy,
        assistant_only_loss=True,
    )


def load_conversations(input: str, cfg: TrainConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, val) conversations of the format output; no training conversation is an error."""
    train_rows = load_split(storage.join(input, "train.jsonl"), cfg.max_train_examples)
    val_rows = load_split(storage.join(input, "val.jsonl"), cfg.max_eval_examples)
    if not train_rows:
        raise TrainDataError(f"{storage.join(input, 'train.jsonl')}: no examples")
    log.info("train: %d conversations, val: %d (from %s)", len(train_rows), len(val_rows), input)
    return train_rows, val_rows


def use_training_template(tokenizer, conversations: list[list[dict]]) -> tuple[str, str]:
    """(the template to ship, the loss masking): the tokenizer gets a training template with generation markers
    when one renders exactly like the model's own ("assistant_turns"), else keeps its own ("last_assistant_turn")."""
    shipped_template = ensure_chat_template(tokenizer)
    training_template = training_chat_template(tokenizer)
    if training_template and renders_identically(tokenizer, shipped_template, training_template, conversations[:16]):
        tokenizer.chat_template = training_template
        return shipped_template, "assistant_turns"
    log.warning(
        "no chat template with generation markers renders like this model's own: training on the "
        "last assistant turn of each conversation only (prompt/completion data)"
    )
    return shipped_template, "last_assistant_turn"


def _messages_row(conversation: list[dict]) -> dict:
    return {"messages": conversation}


def sft_datasets(train_rows: list[list[dict]], val_rows: list[list[dict]], loss_masking: str):
    """(train, val or None) datasets: whole conversations, or prompt/completion rows for the fallback masking."""
    from datasets import Dataset

    to_row = _messages_row if loss_masking == "assistant_turns" else to_prompt_completion
    train_ds = Dataset.from_list([to_row(c) for c in train_rows])
    eval_ds = Dataset.from_list([to_row(c) for c in val_rows]) if val_rows else None
    return train_ds, eval_ds


def sft_trainer(model_path: str, cfg: TrainConfig, args, train_ds, eval_ds, tokenizer, callbacks: list):
    """TRL's SFTTrainer on the base model: a new LoRA adapter (lora, qlora) or every weight (full)."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=load_model(model_path, cfg),
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if cfg.method in ("lora", "qlora") else None,
        callbacks=callbacks,
    )


def check_examples_kept(trainer, given: int, uri: str, cfg: TrainConfig) -> None:
    """TRL drops the examples truncation leaves without a reply: refuse when none is left, warn when some are."""
    if len(trainer.train_dataset) == 0:
        raise TrainDataError(
            f"{uri}: every example lost its assistant turn to "
            f"truncation at train.max_length={cfg.max_length}; raise it or lower format.max_tokens"
        )
    if not cfg.packing and len(trainer.train_dataset) < given:
        log.warning(
            "%d of %d training examples dropped: their reply starts after train.max_length=%d tokens",
            given - len(trainer.train_dataset),
            given,
            cfg.max_length,
        )


def checked_label_mask(trainer, tokenizer, cfg: TrainConfig, loss_masking: str) -> dict:
    """:func:`check_label_mask` on the first collated training rows (no sampler RNG consumed); its counts."""
    n_check = min(cfg.label_check_examples, len(trainer.train_dataset))
    mask_stats = check_label_mask(trainer.data_collator([trainer.train_dataset[i] for i in range(n_check)]), tokenizer)
    log.info(
        "label mask OK: %d of %d tokens trained (%.1f%%), masking=%s",
        mask_stats["trained_tokens"],
        mask_stats["tokens"],
        100 * mask_stats["trained_fraction"],
        loss_masking,
    )
    return mask_stats


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
    train_rows, val_rows = load_conversations(input, cfg)
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path)

    # Data: a training template with generation markers (loss on every assistant turn), or prompt/completion
    shipped_template, loss_masking = use_training_template(tokenizer, train_rows)
    if loss_masking == "last_assistant_turn":
        args.assistant_only_loss, args.completion_only_loss = False, True
    train_ds, eval_ds = sft_datasets(train_rows, val_rows, loss_masking)
    if eval_ds is None:
        args.eval_strategy, args.eval_on_start = "no", False

    # Train: the trainer, the loss mask checked on a real collated batch, then train (resuming if it can)
    mirror, stopper, throughput = make_callbacks(
        output, fingerprint, cfg.save_total_limit, PartialState().num_processes
    )
    trainer = sft_trainer(model_path, cfg, args, train_ds, eval_ds, tokenizer, [mirror, stopper, throughput])
    check_examples_kept(trainer, len(train_ds), storage.join(input, "train.jsonl"), cfg)
    mask_stats = checked_label_mask(trainer, tokenizer, cfg, loss_masking)
    trained = train_resumably(trainer, output, fingerprint, cfg, stopper, scratch)
    if trained["stopped_at"] is not None:
        return preempted(trained, output)

    # Save: ship the model's own template (renders the same), merged model/, adapter/, metrics, _SUCCESS
    tokenizer.chat_template = shipped_template
    extra = {
        "packing": cfg.packing,
        "loss_masking": loss_masking,
        "label_mask": mask_stats,
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
        "model": model,
    }
    return save_outputs(trainer, cfg, run, model_path, output, scratch, tokenizer, throughput, trained, extra=extra)
