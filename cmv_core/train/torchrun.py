"""torchrun with the exit status that a Kubernetes pod failure policy can read.

The train Job's ``podFailurePolicy`` (and the JobSet's ``failurePolicy``) read the pod's exit code:

- **143: stopped on SIGTERM, checkpoint saved, resume me** (a disruption, not the stage's fault). On the
  drained node torchrun itself gets SIGTERM, forwards it to its workers, waits up to
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` and raises ``SignalException``. On every *other* node the workers
  learn of the stop through the OR-reduced stop flag (cmv_core/train/checkpoints.py), save the same step and exit
  143 themselves; torchrun then raises ``ChildFailedError``. Plain ``torchrun`` exits 1 in both cases,
  the same status as a crash; this entry exits 143 in both.
- **2: the stage cannot succeed on a retry** (bad recipe, bad input, upstream ``_SUCCESS`` never came):
  when any worker exited 2, so does the launcher, and the policy fails the Job at once.
- **1: anything else** (a crash, a lost peer): counts against the Job's ``backoffLimit``, or restarts the
  whole JobSet, so every node starts again from the newest complete checkpoint.

    python3 -m cmv_core.train.torchrun --nnodes=2 --nproc-per-node=8 ... -m jobs.train --input ... --output ...
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

log = logging.getLogger("cmv_core.train.torchrun")

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143
EXIT_NOT_RETRYABLE = 2
EXIT_FAILED = 1


def pod_exit_code(worker_exit_codes: list[int]) -> int:
    """The launcher's exit code for its failed workers' codes (a worker killed by signal N reports -N).

    2 wins over everything (retrying cannot help); 143 only when every failed worker stopped on SIGTERM.
    """
    codes = [128 - c if c < 0 else c for c in worker_exit_codes]  # -15 (killed by SIGTERM) -> 143
    if EXIT_NOT_RETRYABLE in codes:
        return EXIT_NOT_RETRYABLE
    if codes and all(c == EXIT_PREEMPTED for c in codes):
        return EXIT_PREEMPTED
    return EXIT_FAILED


def run(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its own arguments); return 0, 128 + signal, 2, or 1 (see the module doc)."""
    try:
        main(argv)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        codes = [f.exitcode for f in failed.failures.values()]
        code = pod_exit_code(codes)
        log.warning("workers exited %s; launcher exits %d", sorted(set(codes)), code)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run())
