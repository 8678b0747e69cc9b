"""Tasks run in worker processes, their results taken back in order, a bounded number in flight.

The workers are spawned (no fork while the gzip writer's thread runs), die with the stage and run
without the cyclic garbage collector.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive the stage (SIGKILL of the stage leaves no orphans): the kernel kills
    it when its parent dies (Linux prctl PR_SET_PDEATHSIG); elsewhere a watcher thread polls."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker_init(parent: int) -> None:
    _die_with_parent(parent)
    # Parsed JSON holds no reference cycles: reference counting frees every thread,
    # and the cyclic collector would only rescan millions of short-lived dicts.
    gc.disable()


# A task: (what it is, the function, its arguments), or (what it is, None, (its result,)).
Task = tuple[tuple, Callable[..., Any] | None, tuple]


def in_order(tasks: Iterable[Task], workers: int) -> Iterator[tuple[tuple, Any]]:
    """(what, result) of every task, in order: run in `workers` processes (in this process when
    workers <= 1), at most 2 tasks per worker in flight (memory: a few chunks a worker)."""
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork while the writer thread runs
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    window: deque[tuple[tuple, Future]] = deque()
    try:
        for what, fn, args in tasks:
            future: Future
            if fn is not None and pool is not None:
                future = pool.submit(fn, *args)
            else:
                future = Future()
                future.set_result(fn(*args) if fn is not None else args[0])
            window.append((what, future))
            while len(window) > (2 * workers if pool is not None else 0):
                what, future = window.popleft()
                yield what, future.result()
        while window:
            what, future = window.popleft()
            yield what, future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
