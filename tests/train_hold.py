"""``cmv`` with training held at its first mirrored checkpoint, for the kill/resume tests.

Run as ``python tests/train_hold.py train ...`` (or as torchrun's worker script). Once the first
checkpoint's ``_COMPLETE`` marker is written, the process waits there until SIGTERM is requested
(the stage's own handler sets the flag) or it is killed: training cannot finish before the test
signals it, however fast it runs. After a SIGTERM it goes on, so the stop happens at the next step.
"""

from __future__ import annotations

import signal
import sys
import time

from cmv_core.train import checkpoints

_real = checkpoints.write_checkpoint_marker
_held = []


def _sigterm_requested() -> bool:
    handler = signal.getsignal(signal.SIGTERM)
    return bool(getattr(getattr(handler, "__self__", None), "requested", False))


def _marker_then_hold(*args, **kwargs):
    files = _real(*args, **kwargs)
    if not _held:
        _held.append(True)
        while not _sigterm_requested():
            time.sleep(0.05)
    return files


checkpoints.write_checkpoint_marker = _marker_then_hold

if __name__ == "__main__":
    from cmv_core.cli import main

    sys.exit(main(sys.argv[1:]))
