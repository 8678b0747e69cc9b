"""Checkpoints at the output URI: mirrored as complete units, resumed after a kill, saved on SIGTERM.

The Trainer saves ``checkpoint-N/`` in a node-local scratch directory; :func:`mirror_checkpoint` mirrors it to
``<output>/checkpoints/checkpoint-N/`` (S3 too) and makes it complete with a ``_COMPLETE`` marker written after
all its files. A restarted run resumes from the newest complete checkpoint of the same inputs and config
(model, optimizer, scheduler, RNG, data position: :func:`fetch_resume_checkpoint`). SIGTERM saves a final
checkpoint, mirrors it, and the stage exits with :data:`EXIT_PREEMPTED` (no ``_SUCCESS``). Used by every
training method (SFT, DPO).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from cmv_core import storage

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "_COMPLETE"
CHECKPOINT_PREFIX = "checkpoint-"
EXIT_PREEMPTED = 143  # what a process killed by SIGTERM reports; here: checkpoint saved, resume me


def scratch_dir(output: str) -> Path:
    """Node-local working directory, the same for every rank of a node (derived from the output URI)."""
    base = Path(os.environ.get("CMV_SCRATCH") or tempfile.gettempdir())
    return base / f"cmv-train-{hashlib.sha256(str(output).encode()).hexdigest()[:12]}"


def checkpoints_uri(output: str) -> str:
    return storage.join(output, "checkpoints")


def list_checkpoints(output: str) -> dict[int, dict | None]:
    """``step -> marker`` for every checkpoint under the output (marker None: incomplete)."""
    found: dict[int, dict | None] = {}
    root = checkpoints_uri(output)
    for rel in storage.list_files(root):
        name = rel.split("/", 1)[0]
        if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX) :].isdigit():
            continue
        step = int(name[len(CHECKPOINT_PREFIX) :])
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
            log.warning(
                "checkpoint-%d has DeepSpeed shards for %s processes, not %d; not resuming from it",
                step,
                marker.get("world_size"),
                world_size,
            )
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


def fetch_resume_checkpoint(
    output: str, fingerprint: str, world_size: int, deepspeed: bool, scratch: Path, local_ckpts: Path
) -> tuple[int, Path] | None:
    """(step, local path) of the newest complete checkpoint of this run, downloaded once per node; or None.

    Also clears the node's scratch directory and (rank 0) the output's incomplete leftovers.
    """
    from accelerate import PartialState

    dist = PartialState()
    found = newest_resumable(output, fingerprint, world_size, deepspeed)
    if dist.is_local_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        local_ckpts.mkdir(parents=True, exist_ok=True)
        if found:
            fetch_checkpoint(output, found[0], found[1], local_ckpts)
    dist.wait_for_everyone()
    if dist.is_main_process:
        delete_incomplete_checkpoints(output)  # leftovers of an upload that was killed midway
    if not found:
        return None
    log.info("resuming from checkpoint-%d (%s)", found[0], checkpoints_uri(output))
    return found[0], local_ckpts / f"{CHECKPOINT_PREFIX}{found[0]}"


# ---------------------------------------------------------------- callbacks


def write_checkpoint_marker(uri: str, step: int, fingerprint: str, world_size: int) -> list[dict]:
    """Rank 0, once every node uploaded: the marker listing every file and its size makes the checkpoint complete."""
    files = [
        {"path": rel, "size": storage.size(storage.join(uri, rel))}
        for rel in storage.list_files(uri)
        if rel != CHECKPOINT_MARKER
    ]
    storage.write_json(
        storage.join(uri, CHECKPOINT_MARKER),
        {
            "step": step,
            "fingerprint": fingerprint,
            "world_size": world_size,
            "files": files,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return files


def mirror_checkpoint(
    output: str, local: Path, step: int, fingerprint: str, world_size: int, save_total_limit: int
) -> None:
    """Upload the checkpoint-N every rank just saved locally, then (rank 0) mark it complete and prune."""
    from accelerate import PartialState

    uri = storage.join(checkpoints_uri(output), f"{CHECKPOINT_PREFIX}{step}")
    dist = PartialState()
    dist.wait_for_everyone()  # every rank finished writing its shards / RNG state
    started = time.monotonic()
    # One uploader per node: on several nodes each holds the shards of its own ranks.
    if dist.is_local_main_process and local.is_dir():
        storage.upload_dir(local, uri)
    dist.wait_for_everyone()
    if dist.is_main_process:
        files = write_checkpoint_marker(uri, step, fingerprint, world_size)
        prune_checkpoints(output, save_total_limit)
        log.info("checkpoint-%d mirrored to %s (%d files, %.1f s)", step, uri, len(files), time.monotonic() - started)
    dist.wait_for_everyone()


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def mirror_checkpoints_callback(output: str, fingerprint: str, save_total_limit: int, world_size: int):
    """A TrainerCallback that mirrors every checkpoint the Trainer saves to the output (:func:`mirror_checkpoint`)."""

    class MirrorCheckpoints(_trainer_callback_base()):
        """After the Trainer saved checkpoint-N locally: upload it, then (rank 0) write its marker."""

        def on_save(self, args, state, control, **kwargs):
            local = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            mirror_checkpoint(output, local, state.global_step, fingerprint, world_size, save_total_limit)
            return control

    return MirrorCheckpoints()


def stop_on_sigterm_callback(world_size: int):
    """A TrainerCallback that turns SIGTERM into a saved, mirrored checkpoint and a stop (installs the handler)."""
    import torch

    class StopOnSigterm(_trainer_callback_base()):
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

    return StopOnSigterm()


def throughput_callback():
    """A TrainerCallback that measures tokens/s (``tokens_per_second()``)."""
    import torch

    class Throughput(_trainer_callback_base()):
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

    return Throughput()


def make_callbacks(output: str, fingerprint: str, save_total_limit: int, world_size: int):
    """The stage's TrainerCallbacks: (mirror checkpoints, stop on SIGTERM, throughput). The classes are built
    when called, so importing this module does not import transformers."""
    return (
        mirror_checkpoints_callback(output, fingerprint, save_total_limit, world_size),
        stop_on_sigterm_callback(world_size),
        throughput_callback(),
    )
