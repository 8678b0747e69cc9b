"""cmv_core.train.torchrun, the train pods' main process, as two "nodes" on CPU (two launchers, gloo, one worker
each): the exit codes the pod failure policies read, and a gang stop/resume through the newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO
from train_fixtures import write_format_output

from cmv_core import storage
from cmv_core.train.torchrun import pod_exit_code

TINY = str(CONFIGS / "tiny.yaml")


def test_pod_exit_code_maps_worker_exits():
    assert pod_exit_code([143]) == 143
    assert pod_exit_code([143, -15]) == 143  # -15: the worker was killed by SIGTERM before its handler ran
    assert pod_exit_code([143, 1]) == 1  # one crashed: not a clean stop
    assert pod_exit_code([2, 143]) == 2  # not retryable wins
    assert pod_exit_code([1]) == 1 and pod_exit_code([-9]) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(node_rank: int, nnodes: int, port: int, train_args: list[str], log: Path, scratch: Path) -> subprocess.Popen:
    """One "node": the train pod's command (k8s/base/train/job.yaml) with the node rank a Job index would give."""
    cmd = [
        sys.executable,
        "-m",
        "cmv_core.train.torchrun",
        f"--nnodes={nnodes}",
        "--nproc-per-node=1",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "cmv_core.cli",
        "train",
        *train_args,
    ]
    # Each node has its own local disk (CMV_SCRATCH), as two pods would.
    env = {**os.environ, "CMV_SCRATCH": str(scratch / f"node{node_rank}"), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def complete_steps(out: str) -> list[int]:
    files = storage.list_files(storage.join(out, "checkpoints")) if storage.exists(out) else []
    return sorted(int(f.split("/")[0].split("-")[1]) for f in files if f.endswith("/_COMPLETE"))


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_worker_exit_2_gives_launcher_exit_2(tmp_path):
    """Input never ready: the train stage exits 2; the launcher passes 2 on (plain torchrun would exit 1)."""
    args = [
        "--input",
        str(tmp_path / "missing"),
        "--output",
        str(tmp_path / "out"),
        "--config",
        TINY,
        "--wait-for-input=0",
    ]
    proc = launch(0, 1, free_port(), args, tmp_path / "node0.log", tmp_path)
    rc = wait_all([proc], 300)[0]
    assert rc == 2, (tmp_path / "node0.log").read_text()[-3000:]
    assert "launcher exits 2" in (tmp_path / "node0.log").read_text()


@pytest.mark.slow
def test_sigterm_on_one_node_stops_both_with_143_and_the_gang_resumes(tmp_path):
    fmt = write_format_output(str(tmp_path / "format"))
    out = str(tmp_path / "train")
    max_steps = 12
    args = [
        "--input",
        fmt,
        "--output",
        out,
        "--config",
        TINY,
        "--set",
        f"train.max_steps={max_steps}",
        "--set",
        "train.save_steps=3",
        "--set",
        "train.max_length=256",
        "--set",
        "train.per_device_train_batch_size=2",
    ]
    port = free_port()
    logs = [tmp_path / "first0.log", tmp_path / "first1.log"]
    procs = [launch(rank, 2, port, args, logs[rank], tmp_path) for rank in (0, 1)]
    deadline = time.monotonic() + 600
    while not complete_steps(out):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # node 1 drained; node 0 hears nothing from Kubernetes
    rcs = wait_all(procs, 300)
    text = [log.read_text() for log in logs]
    assert rcs == [143, 143], text[0][-3000:] + text[1][-3000:]
    assert "launcher exits 143" in text[0]  # node 0: its worker stopped through the shared stop flag
    stopped_at = int(text[0].split("stopped on SIGTERM at step ")[1].split(";")[0])
    assert complete_steps(out)[-1] == stopped_at < max_steps
    assert not storage.exists(storage.join(out, "_SUCCESS"))

    # The gang restarts (new pods on both nodes) and resumes from the checkpoint of the stop.
    port = free_port()
    logs = [tmp_path / "second0.log", tmp_path / "second1.log"]
    procs = [launch(rank, 2, port, args, logs[rank], tmp_path) for rank in (0, 1)]
    assert wait_all(procs, 900) == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == stopped_at and metrics["global_step"] == max_steps
    assert metrics["world_size"] == 2
