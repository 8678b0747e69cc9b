"""Records, for a test, which process writes which file under one output folder.

Put this folder first on PYTHONPATH and set CMV_AUDIT_ROOT (the output) and CMV_AUDIT_LOG (a file
outside it): every process then appends one line ``<RANK> <event> <path>`` per file it opens for
writing (``open`` audit event) or renames into place (``os.rename``, raised by os.replace too)
under the root, after a ``<RANK> start <root>`` line when it starts (so a test knows the rank was
watched). RANK is torchrun's; the launcher itself logs as ``-``. Audit hooks see every
Python-level write, so a rank that wrote an output the stage says only rank 0 writes shows here.
"""

import os
import sys

_ROOT = os.environ.get("CMV_AUDIT_ROOT")
_LOG = os.environ.get("CMV_AUDIT_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under_root(path) -> bool:
    try:
        p = os.path.abspath(os.fsdecode(path))
    except TypeError:  # a file descriptor
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)


def _record(event: str, path) -> None:
    line = f"{os.environ.get('RANK', '-')} {event} {os.path.abspath(os.fsdecode(path))}\n"
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # under the root: filtered out
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _hook(event: str, args) -> None:
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writes and _under_root(path):
            _record("open", path)
    elif event == "os.rename" and _under_root(args[1]):
        _record("rename", args[1])


if _ROOT and _LOG:
    _ROOT = os.path.abspath(_ROOT)
    _record("start", _ROOT)
    sys.addaudithook(_hook)
