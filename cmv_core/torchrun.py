"""torchrun with the exit status that a Kubernetes pod failure policy can read.

On SIGTERM, torchrun forwards the signal to its workers (which save and mirror a checkpoint, then stop:
cmv_core/training.py), waits up to ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` for them, and then raises
``SignalException``: plain ``torchrun`` exits 1, the same status as a crash. This entry exits
128 + the signal number instead (143 for SIGTERM), as a shell would, so that the training Job's
podFailurePolicy can tell a stop on SIGTERM (resumable: not the stage's fault) from a failure.

    python3 -m cmv_core.torchrun --nnodes=2 --nproc-per-node=8 ... -m jobs.train --input ... --output ...
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def run(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its own arguments); return 0, or 128 + signal when stopped by a signal."""
    try:
        main(argv)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run())
