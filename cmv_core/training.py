"""Train stage: supervised fine-tuning (SFT) of a causal LM on the format stage's conversations.

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
- checkpoints every ``save_steps`` mirrored to ``<output>/checkpoints/checkpoint-N/`` (S3 too) and made
  complete by a ``_COMPLETE`` marker written after all their files; a restarted run resumes from the newest
  complete one (model, optimizer, scheduler, RNG, data position). SIGTERM saves a final checkpoint, mirrors
  it and exits with code 143 (no ``_SUCCESS``) so that the restarted Job resumes.

Outputs (rank 0 only): ``model/`` (merged full weights + tokenizer; plain ``transformers``/vLLM load it),
``adapter/`` (LoRA/QLoRA), ``checkpoints/``, ``metrics.json``, ``loss.png``, then ``_SUCCESS``.

Launch
------
One process (CPU or one GPU)::

    cmv train --input <root>/<run>/format --output <root>/<run>/train --config configs/demo.yaml

Several processes / nodes: torchrun starts one process per GPU and each runs the same command. The
Kubernetes training Job (an Indexed Job, one pod per node) is expected to run, as the container's main
process (``exec``, so that it receives SIGTERM)::

    exec python3 -m cmv_core.torchrun \\
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
  it as a disruption, not a failure, in the pod failure policy. (``cmv_core.torchrun`` is torchrun that keeps
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
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmv_core import storage
from cmv_core.config import ConfigError
from cmv_core.errors import InputError

log = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHECKPOINT_MARKER = "_COMPLETE"
CHECKPOINT_PREFIX = "checkpoint-"
EXIT_PREEMPTED = 143  # what a process killed by SIGTERM reports; here: checkpoint saved, resume me
ROLES = ("system", "user", "assistant")


class TrainDataError(InputError):
    """The format stage's output is not usable for training (names file, line and reason)."""


class LabelMaskError(InputError):
    """The loss mask is empty or covers prompt tokens: training would be silently wrong."""


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

    def __post_init__(self) -> None:
        # YAML reads "2e-4" (no dot) as a string: accept it for the float settings
        for key in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "num_train_epochs",
                    "lora_dropout"):
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


def cli_main(args: argparse.Namespace) -> int:
    from cmv_core.config import load_recipe, model_spec, section

    recipe = load_recipe(args.config, args.set)
    cfg = section(recipe, "train", TrainConfig)
    if cfg.deepspeed:
        cfg.deepspeed = resolve_deepspeed_config(cfg.deepspeed, recipe.get("_source"))
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
    out: list[list[dict]] = []
    try:
        for lineno, row in enumerate(storage.read_jsonl(uri), 1):
            out.append(validate_example(row, f"{uri}:{lineno}"))
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


# ---------------------------------------------------------------- chat templates

# SmolLM2-Instruct's ChatML template (as in its GGUF / tokenizer_config) and the same with generation markers:
# the assistant's words and its <|im_end|> (so it learns to stop) are trained, nothing else.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA32_MESSAGE_LINE = (
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}"
)


def llama32_templates() -> tuple[str, str]:
    """(Llama 3.2 Instruct's template as TRL ships it byte-identically, the same with generation markers)."""
    from trl.chat_template_utils import llama3_2_chat_template as original

    if original.count(_LLAMA32_MESSAGE_LINE) != 1:
        raise RuntimeError("TRL's llama3_2 template changed; update training.llama32_templates")
    patched = original.replace(
        _LLAMA32_MESSAGE_LINE,
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
        "{%- else %}" + _LLAMA32_MESSAGE_LINE + "{%- endif %}",
    )
    return original, patched


def training_chat_template(tokenizer) -> str | None:
    """A chat template with ``{% generation %}`` markers for ``tokenizer``'s own template, or None if unknown."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template is None:
        return None
    if has_generation_markers(template):
        return template
    if template == SMOLLM2_TEMPLATE:
        return SMOLLM2_TRAINING_TEMPLATE
    llama_original, llama_training = llama32_templates()
    if template == llama_original:
        return llama_training
    try:
        return get_training_chat_template(tokenizer) or template
    except ValueError:
        return None


def renders_identically(tokenizer, original: str, training: str, conversations: list[list[dict]]) -> bool:
    """The training template must not change a single character of what the model sees."""
    for conv in conversations:
        a = tokenizer.apply_chat_template(conv, tokenize=False, chat_template=original)
        b = tokenizer.apply_chat_template(conv, tokenize=False, chat_template=training)
        if a != b:
            return False
    return True


def ensure_chat_template(tokenizer) -> str:
    """Give a template-less (base) tokenizer the Llama 3.2 template; returns the template to ship in model/."""
    if tokenizer.chat_template is not None:
        return tokenizer.chat_template
    if "<|start_header_id|>" in tokenizer.get_vocab():
        tokenizer.chat_template = llama32_templates()[0]
        log.info("the tokenizer has no chat template: using Llama 3.2's (its special tokens are in the vocabulary)")
        return tokenizer.chat_template
    raise ConfigError("the model's tokenizer has no chat template; use an instruct model (e.g. *-Instruct)")


# ---------------------------------------------------------------- label mask check (pure)


def end_of_turn_ids(tokenizer) -> set[int]:
    """Special tokens that legitimately end an assistant turn (and so are trained)."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>") if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def check_label_mask(batch: dict, tokenizer) -> dict:
    """Verify a collated batch: some tokens are trained, and none of them is prompt structure.

    Prompt structure = the special tokens that open a turn (``<|im_start|>``, ``<|start_header_id|>``, BOS,
    ...) and the first token of every sequence: a mask that covered the prompt would include them. Only the
    end-of-turn token is allowed among the trained special tokens.
    """
    import torch

    input_ids, labels = batch["input_ids"], batch["labels"]
    trained = labels != -100
    n_trained = int(trained.sum())
    if n_trained == 0:
        raise LabelMaskError(
            "the label mask of a real training batch is empty: no assistant token would be trained. The chat "
            "template's {% generation %} markers do not match the data (or every reply was truncated away by "
            "train.max_length)."
        )
    if "position_ids" in batch:  # packed / padding-free: a sequence starts wherever the position restarts
        starts = batch["position_ids"] == 0
        real = torch.ones_like(trained) if "attention_mask" not in batch else batch["attention_mask"].bool()
    else:
        starts = torch.zeros_like(trained)
        starts[:, 0] = True
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(trained)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    structural = sorted(special - end_of_turn_ids(tokenizer))
    on_structure = trained & torch.isin(input_ids, torch.tensor(structural, dtype=input_ids.dtype))
    on_start = trained & starts
    bad = on_structure | on_start
    if bool(bad.any()):
        row, pos = (int(x) for x in bad.nonzero()[0])
        context = tokenizer.decode(input_ids[row, max(0, pos - 8): pos + 8])
        raise LabelMaskError(
            f"the label mask covers prompt tokens (row {row}, position {pos}, around {context!r}): the loss would "
            "be computed on the prompt, not only on the assistant's reply"
        )
    n_real = int(real.sum())
    if n_trained >= n_real:
        raise LabelMaskError("the label mask covers every token of the batch, the prompt included")
    return {"trained_tokens": n_trained, "tokens": n_real, "trained_fraction": round(n_trained / n_real, 4)}


# ---------------------------------------------------------------- checkpoints at the output URI


def checkpoints_uri(output: str) -> str:
    return storage.join(output, "checkpoints")


def list_checkpoints(output: str) -> dict[int, dict | None]:
    """``step -> marker`` for every checkpoint under the output (marker None: incomplete)."""
    found: dict[int, dict | None] = {}
    root = checkpoints_uri(output)
    for rel in storage.list_files(root):
        name = rel.split("/", 1)[0]
        if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX):].isdigit():
            continue
        step = int(name[len(CHECKPOINT_PREFIX):])
        found.setdefault(step, None)
        if rel == f"{name}/{CHECKPOINT_MARKER}":
            try:
                found[step] = storage.read_json(storage.join(root, rel))
            except (ValueError, FileNotFoundError):
                log.warning("unreadable checkpoint marker %s; ignoring that checkpoint", storage.join(root, rel))
    return found


def newest_resumable(output: str, fingerprint: str, world_size: int, deepspeed: bool) -> tuple[int, dict] | None:
    """The newest complete checkpoint of this same run (inputs and config) that this world size can load."""
    for step, marker in sorted(list_checkpoints(output).items(), reverse=True):
        if marker is None:
            continue
        if marker.get("fingerprint") != fingerprint:
            log.warning("checkpoint-%d was written with other inputs or config; not resuming from it", step)
            continue
        if deepspeed and marker.get("world_size") != world_size:
            log.warning("checkpoint-%d has DeepSpeed shards for %s processes, not %d; not resuming from it",
                        step, marker.get("world_size"), world_size)
            continue
        return step, marker
    return None


def fetch_checkpoint(output: str, step: int, marker: dict, local_dir: Path) -> Path:
    """Download one complete checkpoint and check every file the marker lists arrived whole."""
    uri = storage.join(checkpoints_uri(output), f"{CHECKPOINT_PREFIX}{step}")
    target = local_dir / f"{CHECKPOINT_PREFIX}{step}"
    storage.download_dir(uri, target)
    (target / CHECKPOINT_MARKER).unlink(missing_ok=True)
    for f in marker.get("files", []):
        p = target / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"]:
            raise RuntimeError(f"checkpoint download {uri}: {f['path']} missing or truncated")
    return target


def prune_checkpoints(output: str, keep: int, keep_step: int | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and incomplete leftovers.

    The marker goes first, so a half-deleted checkpoint never looks complete.
    """
    found = list_checkpoints(output)
    complete = sorted((s for s, m in found.items() if m is not None), reverse=True)
    newest = complete[0] if complete else -1
    doomed = complete[keep:] + [s for s, m in found.items() if m is None and s < newest]
    for step in doomed:
        if step == keep_step:
            continue
        uri = storage.join(checkpoints_uri(output), f"{CHECKPOINT_PREFIX}{step}")
        storage.delete(storage.join(uri, CHECKPOINT_MARKER))
        storage.delete_prefix(uri)


def delete_incomplete_checkpoints(output: str) -> None:
    for step, marker in list_checkpoints(output).items():
        if marker is None:
            log.info("removing incomplete checkpoint-%d at the output (killed while it was uploaded)", step)
            storage.delete_prefix(storage.join(checkpoints_uri(output), f"{CHECKPOINT_PREFIX}{step}"))


# ---------------------------------------------------------------- callbacks


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def make_callbacks(output: str, fingerprint: str, cfg: TrainConfig, world_size: int):
    """The stage's TrainerCallbacks (classes built lazily: no transformers import at module load)."""
    import torch
    from accelerate import PartialState

    base = _trainer_callback_base()

    class MirrorCheckpoints(base):
        """After the Trainer saved checkpoint-N locally: upload it, then (rank 0) write its marker."""

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            local = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
            uri = storage.join(checkpoints_uri(output), f"{CHECKPOINT_PREFIX}{step}")
            dist = PartialState()
            dist.wait_for_everyone()  # every rank finished writing its shards / RNG state
            started = time.monotonic()
            # One uploader per node: on several nodes each holds the shards of its own ranks.
            if dist.is_local_main_process and local.is_dir():
                storage.upload_dir(local, uri)
            dist.wait_for_everyone()
            if dist.is_main_process:
                files = [{"path": rel, "size": storage.size(storage.join(uri, rel))}
                         for rel in storage.list_files(uri) if rel != CHECKPOINT_MARKER]
                storage.write_json(storage.join(uri, CHECKPOINT_MARKER), {
                    "step": step, "fingerprint": fingerprint, "world_size": world_size, "files": files,
                    "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                })
                prune_checkpoints(output, cfg.save_total_limit)
                log.info("checkpoint-%d mirrored to %s (%d files, %.1f s)", step, uri, len(files),
                         time.monotonic() - started)
            dist.wait_for_everyone()
            return control

    class StopOnSigterm(base):
        """SIGTERM (pod eviction, preemption) -> save and mirror a checkpoint at the end of this step, stop.

        The flag is OR-reduced over all ranks every step, so that every rank stops at the same step even if
        the signal reached them at different times (otherwise the collectives of the save would hang).
        """

        def __init__(self):
            self.requested = False
            self.stopped_at: int | None = None
            self._previous = signal.signal(signal.SIGTERM, self._handler)

        def _handler(self, signum, frame):
            if not self.requested:
                log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
            self.requested = True

        def restore(self):
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

        def on_step_end(self, args, state, control, **kwargs):
            stop = self.requested
            if world_size > 1:
                flag = torch.tensor([1.0 if stop else 0.0], device=args.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop = bool(flag.item() > 0)
            if stop:
                self.requested = True
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

    class Throughput(base):
        """Tokens/s over the optimizer steps only (no eval, no checkpoint upload), first step excluded."""

        def __init__(self):
            self.step_started = 0.0
            self.tokens_before = 0
            self.seconds = 0.0
            self.tokens = 0
            self.steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync(args)
            self.step_started = time.perf_counter()
            self.tokens_before = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self._sync(args)
            elapsed = time.perf_counter() - self.step_started
            self.steps += 1
            if self.steps > 1:  # the first step pays for kernel selection and allocator warm-up
                self.seconds += elapsed
                self.tokens += state.num_input_tokens_seen - self.tokens_before

        @staticmethod
        def _sync(args):
            if args.device.type == "cuda":
                torch.cuda.synchronize()

        def tokens_per_second(self) -> float | None:
            return round(self.tokens / self.seconds, 2) if self.seconds > 0 else None

    return MirrorCheckpoints(), StopOnSigterm(), Throughput()


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
        raise ConfigError(f"train.attn_implementation={cfg.attn_implementation} needs a GPU and the {module} "
                          "package; use sdpa")


def load_model(model_path: str, cfg: TrainConfig):
    """The base causal LM (4-bit for QLoRA). Call after the SFTConfig exists (ZeRO-3 partitions at load)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(weights_dtype(cfg)), "attn_implementation": cfg.attn_implementation}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute,  # storage dtype: ZeRO-3 compatible
        )
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # no KV cache while training
    return model


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", bias="none",
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


def sft_config(cfg: TrainConfig, scratch: Path, *, has_eval: bool, packing_tokens: bool):
    from trl import SFTConfig

    import torch

    on_gpu = torch.cuda.is_available()
    configured_state = bool(cfg.deepspeed) and not on_gpu
    if configured_state:
        start_cpu_deepspeed_state()
    return SFTConfig(
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
        packing=cfg.packing,
        packing_strategy=cfg.packing_strategy,
        assistant_only_loss=True,
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
        include_num_input_tokens_seen="all" if packing_tokens else "non_padding",
        report_to="none",
        ddp_find_unused_parameters=False if cfg.method != "full" else None,
        save_only_model=False,
        disable_tqdm=not (int(os.environ.get("RANK", "0")) == 0),
        accelerator_config={"use_configured_state": True} if configured_state else None,
        # Without it, accelerate on CPU counts one process per node under torchrun --nnodes N, and every node
        # behaves as rank 0 (the multi-node Job test found this).
        use_cpu=not on_gpu and not configured_state,
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
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss (val)", marker="o", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
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
    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "peak_memory_kind": "cpu_max_rss"}


def build_metrics(state, throughput, *, final_eval: dict | None, extra: dict) -> dict:
    history = state.log_history
    train_loss = [{k: h[k] for k in ("step", "loss", "learning_rate", "grad_norm", "num_tokens",
                                     "mean_token_accuracy", "num_input_tokens_seen") if k in h}
                  for h in history if "loss" in h]
    # the final evaluate() repeats the last periodic eval when they fall on the same step: keep one per step
    eval_loss = list({h["step"]: {"step": h["step"], "eval_loss": h["eval_loss"]}
                      for h in history if "eval_loss" in h}.values())
    return {
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "final_eval_loss": (final_eval or {}).get("eval_loss"),
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": throughput.tokens_per_second(),
        **peak_memory(),
        **extra,
    }


# ---------------------------------------------------------------- the stage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir(output: str) -> Path:
    """Node-local working directory, the same for every rank of a node (derived from the output URI)."""
    base = Path(os.environ.get("CMV_SCRATCH") or tempfile.gettempdir())
    return base / f"cmv-train-{hashlib.sha256(str(output).encode()).hexdigest()[:12]}"


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
    cfg = config
    check_hardware(cfg)
    if cfg.deepspeed and not cfg.deepspeed.endswith(".json"):
        cfg.deepspeed = resolve_deepspeed_config(cfg.deepspeed)
    if cfg.deepspeed and "WORLD_SIZE" not in os.environ:
        # DeepSpeed always wants a process group; give a plain single process one.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from cmv_core.config import to_dict
    from cmv_core.models import load_tokenizer, resolve_model

    # Check inputs, decide skip (rank 0 decides; the others follow)
    scratch = scratch_dir(output)
    args = sft_config(cfg, scratch, has_eval=True, packing_tokens=cfg.packing)  # initializes the process group
    dist = PartialState()
    world_size = dist.num_processes
    run = None
    decision: list[Any] = [None]
    if dist.is_main_process:
        had_success = storage.exists(storage.join(output, storage.SUCCESS))
        # The DeepSpeed settings go in by content, not by path: the same run in another checkout or image must
        # match its manifest and resume its checkpoints.
        stage_config = {"train": {**to_dict(cfg), "deepspeed": deepspeed_dict(cfg.deepspeed) if cfg.deepspeed
                                  else None}, "model": model}
        run = storage.begin_stage("train", output, inputs=[input], config=stage_config, run_id=run_id, force=force)
        if run is None:
            decision[0] = {"skip": True}
        else:
            if had_success:  # a finished run's checkpoints must not be "resumed" by a forced or changed rerun
                storage.delete_prefix(checkpoints_uri(output))
            fingerprint = hashlib.sha256(json.dumps(
                {"inputs": run.inputs, "config": run.config}, sort_keys=True).encode()).hexdigest()
            decision[0] = {"skip": False, "fingerprint": fingerprint}
    if world_size > 1:
        broadcast_object_list(decision)
    if decision[0]["skip"]:
        return None
    fingerprint = decision[0]["fingerprint"]

    # Load data
    train_rows = load_split(storage.join(input, "train.jsonl"), cfg.max_train_examples)
    val_rows = load_split(storage.join(input, "val.jsonl"), cfg.max_eval_examples)
    if not train_rows:
        raise TrainDataError(f"{storage.join(input, 'train.jsonl')}: no examples")
    log.info("train: %d conversations, val: %d (from %s)", len(train_rows), len(val_rows), input)

    # Tokenizer and loss mask: a training template with generation markers, or prompt/completion data
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path)
    shipped_template = ensure_chat_template(tokenizer)
    training_template = training_chat_template(tokenizer)
    if training_template and renders_identically(tokenizer, shipped_template, training_template, train_rows[:16]):
        tokenizer.chat_template = training_template
        loss_masking = "assistant_turns"
        to_row = lambda conv: {"messages": conv}  # noqa: E731
    else:
        log.warning("no chat template with generation markers renders like this model's own: training on the "
                    "last assistant turn of each conversation only (prompt/completion data)")
        loss_masking = "last_assistant_turn"
        args.assistant_only_loss = False
        args.completion_only_loss = True
        to_row = to_prompt_completion

    from datasets import Dataset

    train_ds = Dataset.from_list([to_row(c) for c in train_rows])
    eval_ds = Dataset.from_list([to_row(c) for c in val_rows]) if val_rows else None
    if eval_ds is None:
        from transformers.trainer_utils import IntervalStrategy

        args.eval_strategy = IntervalStrategy.NO
        args.eval_on_start = False

    # Model
    model_obj = load_model(model_path, cfg)
    peft_config = lora_config(cfg) if cfg.method in ("lora", "qlora") else None

    # Trainer (callbacks: mirror checkpoints, stop on SIGTERM, measure throughput)
    from trl import SFTTrainer

    mirror, stopper, throughput = make_callbacks(output, fingerprint, cfg, world_size)
    trainer = SFTTrainer(
        model=model_obj, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[mirror, stopper, throughput],
    )

    if len(trainer.train_dataset) == 0:
        raise TrainDataError(f"{storage.join(input, 'train.jsonl')}: every example lost its assistant turn to "
                             f"truncation at train.max_length={cfg.max_length}; raise it or lower format.max_tokens")
    if not cfg.packing and len(trainer.train_dataset) < len(train_ds):
        log.warning("%d of %d training examples dropped: their reply starts after train.max_length=%d tokens",
                    len(train_ds) - len(trainer.train_dataset), len(train_ds), cfg.max_length)

    # Verify the loss mask on a real collated batch (first rows: no sampler RNG is consumed)
    n_check = min(cfg.label_check_examples, len(trainer.train_dataset))
    mask_stats = check_label_mask(trainer.data_collator([trainer.train_dataset[i] for i in range(n_check)]), tokenizer)
    log.info("label mask OK: %d of %d tokens trained (%.1f%%), masking=%s", mask_stats["trained_tokens"],
             mask_stats["tokens"], 100 * mask_stats["trained_fraction"], loss_masking)

    # Resume from the newest complete checkpoint at the output URI, if any
    local_ckpts = Path(args.output_dir)
    found = newest_resumable(output, fingerprint, world_size, bool(cfg.deepspeed))
    resume_path = None
    if dist.is_local_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        local_ckpts.mkdir(parents=True, exist_ok=True)
        if found:
            resume_path = fetch_checkpoint(output, found[0], found[1], local_ckpts)
    dist.wait_for_everyone()
    if dist.is_main_process:
        delete_incomplete_checkpoints(output)  # leftovers of an upload that was killed midway
    if found:
        resume_path = local_ckpts / f"{CHECKPOINT_PREFIX}{found[0]}"
        log.info("resuming from checkpoint-%d (%s)", found[0], checkpoints_uri(output))

    # Train
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions at load)
    trainable = sum(numel(p) for p in trainer.model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in trainer.model.parameters())
    started = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    finally:
        stopper.restore()
    resumed_from = found[0] if found else None
    if stopper.stopped_at is not None:
        log.warning("stopped on SIGTERM at step %d; checkpoint mirrored to %s; exiting %d so the Job resumes",
                    stopper.stopped_at, checkpoints_uri(output), EXIT_PREEMPTED)
        return {"preempted": True, "step": stopper.stopped_at, "resumed_from_step": resumed_from}
    last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last_eval is not None and last_eval["step"] == trainer.state.global_step:
        final_eval = last_eval  # the periodic eval just ran on this very step
    else:
        final_eval = trainer.evaluate() if eval_ds is not None else None

    # Save: adapter/weights gathered from every rank (ZeRO-3 safe), then rank 0 merges, checks and uploads
    final_local = scratch / "final"
    tokenizer.chat_template = shipped_template  # ship the model's own template (renders the same)
    trainer.save_model(str(final_local))
    summary: dict[str, Any] = {}
    if dist.is_main_process:
        summary = _publish(trainer, cfg, model_path, output, final_local, scratch, tokenizer)
        metrics = build_metrics(trainer.state, throughput, final_eval=final_eval, extra={
            "resumed_from_step": resumed_from,
            "train_runtime_s": round(time.monotonic() - started, 2),
            "world_size": world_size, "method": cfg.method, "deepspeed": Path(cfg.deepspeed).name if cfg.deepspeed
            else None, "precision": cfg.precision, "packing": cfg.packing, "loss_masking": loss_masking,
            "label_mask": mask_stats, "trainable_parameters": trainable, "parameters": total,
            "train_examples": len(train_rows), "val_examples": len(val_rows), "model": model,
        })
        storage.write_json(storage.join(output, "metrics.json"), metrics)
        write_loss_plot(trainer.state.log_history, storage.join(output, "loss.png"))
        if not cfg.keep_checkpoints:
            storage.delete_prefix(checkpoints_uri(output))
        summary.update({k: metrics[k] for k in ("global_step", "final_eval_loss", "tokens_seen",
                                                 "tokens_per_second", "resumed_from_step")})
        storage.finish_stage(run, summary, declared=True)
        log.info("train: %d steps, final eval loss %s, %s tokens/s; wrote %s", metrics["global_step"],
                 metrics["final_eval_loss"], metrics["tokens_per_second"], output)
    dist.wait_for_everyone()
    if dist.is_local_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


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


def _publish(trainer, cfg: TrainConfig, model_path: str, output: str, final_local: Path, scratch: Path,
             tokenizer) -> dict:
    """Rank 0: check what save_model wrote, merge LoRA, upload adapter/ and model/."""
    with zero3_init_disabled():
        return _publish_local(cfg, model_path, output, final_local, scratch, tokenizer)


def _publish_local(cfg: TrainConfig, model_path: str, output: str, final_local: Path, scratch: Path,
                   tokenizer) -> dict:
    for stale in ("model", "adapter"):  # a previous run's files must not survive into this manifest
        storage.delete_prefix(storage.join(output, stale))
    (final_local / "training_args.bin").unlink(missing_ok=True)  # a pickle of this run's args: not an artifact
    if cfg.method in ("lora", "qlora"):
        adapter_tensors, adapter_elements = count_safetensors(final_local)
        tokenizer.save_pretrained(final_local)
        storage.upload_dir(final_local, storage.join(output, "adapter"))
        merged = scratch / "merged"
        merge_adapter(model_path, final_local, merged, weights_dtype(cfg) if cfg.method == "lora" else
                      ("bfloat16" if cfg.precision == "bf16" else "float16"))
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
    return {"model_tensors": tensors, "model_parameters": elements,
            "adapter_tensors": adapter_tensors, "adapter_parameters": adapter_elements}
