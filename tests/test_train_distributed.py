"""Train stage under torchrun + DeepSpeed ZeRO-3, and preemption: kill / SIGTERM, then resume from S3."""

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
from train_fixtures import assert_same_adapter, write_format_output

from cmv_core import storage

TINY = str(CONFIGS / "tiny.yaml")


AUDIT = Path(__file__).parent / "write_audit"


def audited_env(out: Path, log: Path) -> dict:
    """The environment for a torchrun that logs, per process, every file it writes under ``out``
    (tests/write_audit/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(AUDIT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "CMV_AUDIT_ROOT": str(out), "CMV_AUDIT_LOG": str(log)}


def assert_one_writer(out: Path, log: Path) -> None:
    """Every file the output's _SUCCESS lists (model/, adapter/, metrics.json, loss.png...) and the
    _SUCCESS itself were renamed into place once, by rank 0; rank 1 (watched too) wrote nothing there,
    not even a checkpoint shard (rank 0 mirrors the checkpoints)."""
    events = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert {rank for rank, event, _ in events if event == "start"} == {"-", "0", "1"}
    listed = [f["path"] for f in storage.require_success(str(out))["files"]] + ["_SUCCESS"]
    assert {"metrics.json", "loss.png", "model/config.json", "adapter/adapter_model.safetensors"} <= set(listed)
    published = [(rank, os.path.relpath(path, out)) for rank, event, path in events if event == "rename"]
    for rel in listed:
        assert [rank for rank, r in published if r == rel] == ["0"], rel
    assert [path for rank, event, path in events if rank != "0" and event != "start"] == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_zero3_lora_saves_loadable_adapter(tmp_path, tiny_model_dir):
    """2 CPU processes (gloo), ZeRO-3 shards the weights; the saved adapter must be whole, not ZeRO-3 stubs."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fmt = write_format_output(str(tmp_path / "format"), n_train=16, n_val=4)
    out = tmp_path / "train"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "cmv_core.cli",
        "train",
        "--input",
        fmt,
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "train.deepspeed=zero3",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.max_length=256",
    ]
    writes = tmp_path / "writes.log"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=audited_env(out, writes))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_one_writer(out, writes)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["deepspeed"] == "zero3.json" and metrics["global_step"] == 2
    # Both ranks saved their own DeepSpeed shards into the mirrored checkpoint
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert {p.name for p in (ckpt / "global_step2").iterdir()} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert json.loads((ckpt / "_COMPLETE").read_text())["world_size"] == 2

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    n_layers = 2
    assert len(adapter) == 2 * 7 * n_layers  # A and B for the 7 linear layers of each block ("all-linear")
    assert all(t.numel() > 0 for t in adapter.values())
    assert all(t.shape[0] == config["r"] for k, t in adapter.items() if "lora_A" in k)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # trained (B starts at zero)

    AutoModelForCausalLM.from_pretrained(str(out / "model"))  # merged weights load with plain transformers
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter"))
    assert peft_model.peft_config["default"].r == config["r"]
    assert storage.require_success(str(out))["summary"]["adapter_tensors"] == len(adapter)
    assert torch.isfinite(torch.tensor(metrics["final_eval_loss"]))


def start_training(
    fmt: str, out: str, max_steps: int, save_steps: int, log_path: Path, torchrun: bool = False, hold: bool = False
) -> subprocess.Popen:
    """``cmv train`` in the background. torchrun: launched as the training Job launches it
    (cmv_core.train.torchrun as the main process), one worker. hold: the worker waits at its first
    mirrored checkpoint until SIGTERM or SIGKILL (tests/train_hold.py), so that a test that stops it
    there cannot lose the race to a training run that finishes first."""
    launcher = (
        ["-m", "cmv_core.train.torchrun", "--nproc-per-node=1", f"--master-port={free_port()}"] if torchrun else []
    )
    entry = [str(Path(__file__).parent / "train_hold.py")] if hold else ["-m", "cmv_core.cli"]
    cmd = [
        sys.executable,
        *launcher,
        *entry,
        "train",
        "--input",
        fmt,
        "--output",
        out,
        "--config",
        TINY,
        "--set",
        f"train.max_steps={max_steps}",
        "--set",
        f"train.save_steps={save_steps}",
        "--set",
        "train.save_total_limit=2",
        "--set",
        "train.max_length=256",
        "--set",
        "train.per_device_train_batch_size=2",
    ]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))


def complete_steps(out: str) -> list[int]:
    files = storage.list_files(storage.join(out, "checkpoints"))
    return sorted(int(f.split("/")[0].split("-")[1]) for f in files if f.endswith("/_COMPLETE"))


def wait_for_checkpoint(proc: subprocess.Popen, out: str, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = complete_steps(out)
        if steps:
            return steps[-1]
        assert proc.poll() is None, "training ended before its first checkpoint was mirrored"
        time.sleep(0.05)
    raise AssertionError("no complete checkpoint appeared at the output")


@pytest.mark.slow
def test_killed_run_resumes_from_newest_s3_checkpoint(tmp_path, s3_bucket):
    """SIGKILL (no chance to clean up) after the first checkpoint reached S3; the rerun resumes there."""
    fmt = write_format_output(str(tmp_path / "format"))
    out = f"{s3_bucket}/run/train"
    max_steps = 8
    proc = start_training(fmt, out, max_steps, save_steps=2, log_path=tmp_path / "first.log", hold=True)
    try:
        wait_for_checkpoint(proc, out)  # held there until killed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumable = complete_steps(out)[-1]  # frozen now that the process is dead
    assert resumable == 2
    assert not storage.exists(storage.join(out, "_SUCCESS"))

    second = start_training(fmt, out, max_steps, save_steps=2, log_path=tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log = (tmp_path / "second.log").read_text()
    assert f"resuming from checkpoint-{resumable}" in log
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    assert metrics["resumed_from_step"] == resumable
    assert metrics["global_step"] == max_steps
    # the restored history starts at step 1: the resumed run continued it instead of starting over
    steps_logged = [r["step"] for r in metrics["train_loss"]]
    assert steps_logged == list(range(1, max_steps + 1))
    assert storage.require_success(out)["summary"]["resumed_from_step"] == resumable
    # old checkpoints were pruned to save_total_limit, all complete
    assert complete_steps(out) == [max_steps - 2, max_steps]

    # Resumed = never interrupted: same losses at every step and bit-identical trained weights
    # (optimizer, scheduler, RNG and data position all came back from the checkpoint)
    baseline = tmp_path / "baseline"
    third = start_training(fmt, str(baseline), max_steps, save_steps=2, log_path=tmp_path / "baseline.log")
    assert third.wait(timeout=900) == 0, (tmp_path / "baseline.log").read_text()[-4000:]
    expected = json.loads((baseline / "metrics.json").read_text())
    assert [r["loss"] for r in metrics["train_loss"]] == [r["loss"] for r in expected["train_loss"]]
    assert_same_adapter(out, baseline, tmp_path)


@pytest.mark.slow
def test_sigterm_saves_a_final_checkpoint_then_resume_finishes(tmp_path, s3_bucket):
    """SIGTERM mid-run: a checkpoint of the current step is mirrored, exit code 143, no _SUCCESS; rerun finishes.

    The signal goes to the launcher, as Kubernetes sends it to the pod's main process; it forwards it to the worker.
    """
    fmt = write_format_output(str(tmp_path / "format"))
    out = f"{s3_bucket}/run/train"
    max_steps = 12
    proc = start_training(fmt, out, max_steps, save_steps=4, log_path=tmp_path / "first.log", torchrun=True, hold=True)
    try:
        first = wait_for_checkpoint(proc, out)  # held there until the SIGTERM
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "first.log").read_text()
    assert rc == 143, log[-4000:]
    assert "stopped on SIGTERM at step" in log
    stopped_at = int(log.split("stopped on SIGTERM at step ")[1].split(";")[0])
    assert first == 4 and stopped_at == first + 1  # released by the SIGTERM, stopped at the next step's end
    assert complete_steps(out)[-1] == stopped_at  # the extra checkpoint, complete at the output
    assert not storage.exists(storage.join(out, "_SUCCESS"))

    second = start_training(fmt, out, max_steps, save_steps=4, log_path=tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-4000:]
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    assert metrics["resumed_from_step"] == stopped_at and metrics["global_step"] == max_steps
