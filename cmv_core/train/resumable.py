"""A training run that survives being killed: the skip decision and the fingerprint its checkpoints carry,
training from the newest complete checkpoint, and the result of a stop on SIGTERM. Every method uses them."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cmv_core import storage
from cmv_core.config import to_dict
from cmv_core.train.checkpoints import EXIT_PREEMPTED, checkpoints_uri, fetch_resume_checkpoint
from cmv_core.train.config import TrainConfig, deepspeed_dict

log = logging.getLogger(__name__)


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
