"""`cmv run` forks each stage from a process that imported the model libraries once (cmv_core/cli.py):
a forked stage must end like the same stage started from scratch (exit code, its one error line, its log
level), and a SIGTERM passed on to it must stop it the way a stage stops (143)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmv_core import cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _argv(tmp_path: Path, dump: str) -> list[str]:
    return ["clean", "--input", dump, "--output", str(tmp_path / "clean"), "--config", TINY, "--log-level", "ERROR"]


def test_forked_stage_ends_like_a_fresh_process(tmp_path, capfd):
    argv = _argv(tmp_path, str(tmp_path / "missing.jsonlist"))
    fresh = subprocess.run([sys.executable, "-m", "cmv_core.cli", *argv], capture_output=True, text=True, cwd=REPO)
    capfd.readouterr()
    rc = cli._run_stage_process([sys.executable, "-m", "cmv_core.cli", *argv], fork=True)
    err = capfd.readouterr().err
    assert fresh.returncode != 0 and rc == fresh.returncode
    assert [line for line in err.splitlines() if "error:" in line] == [
        line for line in fresh.stderr.splitlines() if "error:" in line
    ]
    assert " INFO " not in err  # the stage's own --log-level, not the parent's logging setup


def test_sigterm_reaches_a_forked_stage(tmp_path, capfd):
    fifo = tmp_path / "dump.jsonlist"
    os.mkfifo(fifo)  # clean blocks opening it: a stage caught mid-run
    child = cli._ForkedStage(_argv(tmp_path, str(fifo)))
    lease = tmp_path / "clean" / "_LEASE"
    deadline = time.monotonic() + 60
    while not lease.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.exists()
    child.send_signal(signal.SIGTERM)
    assert child.wait() == 143
    assert "cmv clean: error: stopped by SIGTERM" in capfd.readouterr().err
    assert not lease.exists()
