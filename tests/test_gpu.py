"""The gpu tier (`make test-gpu`, `pytest -m gpu -rs`): what only a CUDA machine can check.

- training throughput: benchmarks/bench_train.py's --gpu-1b path (random-init Llama-3.2-1B, nothing
  downloaded) for a few steps through the real `cmv train`; asserts the stage's metrics and records
  tokens/s and MFU in ``gpu_train_throughput.json`` under the test's tmp dir (and prints them);
- vLLM generation of the base model and of the fine-tuned one as a LoRA adapter on it, after a tiny train;
- DeepSpeed ZeRO-3 over 2 GPUs under torchrun.

Each test skips with its reason where its hardware or package is missing (on a CPU machine all do, and
`make test-gpu` exits 0 saying how many skipped). The last test (no mark) runs bench_train's shared helpers on
CPU in the ordinary tiers, so that the GPU test's building blocks cannot rot unseen.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO, run_cmv

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402  (benchmarks/ is not a package: the benchmark's own functions, not a copy)

TINY = str(CONFIGS / "tiny.yaml")


def cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture()
def cuda() -> int:
    """The number of CUDA devices; skips (with the reason) where there is none."""
    n = cuda_devices()
    if n == 0:
        pytest.skip("no CUDA device (torch.cuda.is_available() is False): the gpu tier needs an NVIDIA GPU")
    return n


@pytest.mark.gpu
def test_train_throughput_random_llama_1b(cuda, tmp_path, tiny_model_dir):
    """bench_train --gpu-1b, full fine-tuning with bfd packing, a few steps: the stage trains and measures."""
    import torch

    device = torch.cuda.get_device_name(0)
    peak = bench_train.peak_tflops(device)
    steps, batch, max_length, mean_words = 6, 4, 1024, 700
    n_params = bench_train.build_random_1b(tmp_path / "llama-3.2-1b-random", tiny_model_dir)
    assert n_params == 1_235_814_400  # Llama-3.2-1B, tied embedding counted once (as the CPU test below)
    n_train = bench_train.gpu_data_size(steps, batch, max_length, mean_words)
    fmt = bench_train.write_data(str(tmp_path / "format"), n_train=n_train, n_val=8, mean_words=mean_words)
    train = {
        **bench_train.gpu_train_settings(steps, batch, max_length),
        "method": "full",
        "packing_strategy": "bfd",
        "logging_steps": 1,
        "learning_rate": 1.0e-4,
    }
    model = str(tmp_path / "llama-3.2-1b-random")
    m = bench_train.run_variant(fmt, tmp_path, "full", model, train, timeout=1200, keep=True)

    assert m["global_step"] == steps and m["method"] == "full" and m["precision"] == "bf16"
    assert m["tokens_per_second"] > 0 and m["tokens_seen"] >= steps * batch * max_length // 2
    losses = [row["loss"] for row in m["train_loss"]]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert changed_weights(model, str(tmp_path / "full" / "model")) or losses[-1] < losses[0]
    record = {
        "device": device,
        "n_params": n_params,
        "tokens_per_second": m["tokens_per_second"],
        "mfu": bench_train.mfu(6, n_params, m["tokens_per_second"], peak) if peak else None,
        "peak_tflops": peak,
        "peak_memory_gib": round(m["peak_memory_bytes"] / 2**30, 2),
        "steps": steps,
        "batch_size": batch,
        "max_length": max_length,
        "losses": losses,
    }
    (tmp_path / "gpu_train_throughput.json").write_text(json.dumps(record, indent=2))
    print(f"\ngpu train throughput ({tmp_path / 'gpu_train_throughput.json'}): {json.dumps(record)}")


def changed_weights(before: str, after: str) -> bool:
    """Whether any tensor of the trained model differs from the initial one."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: str) -> dict:
        out: dict = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(before), tensors(after)
    return any(k in b and not torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.mark.gpu
def test_vllm_generates_base_and_lora_finetuned_from_one_engine(cuda, tmp_path, format_output):
    pytest.importorskip("vllm", reason="vllm is not installed (the generate image has it: pip install vllm)")
    train = tmp_path / "train"
    run_cmv("train", "--input", format_output, "--output", str(train), "--config", TINY, "--set", "train.max_steps=2")
    out = tmp_path / "generate"
    run_cmv(
        "generate",
        "--data",
        format_output,
        "--trained",
        str(train),
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "generate.backend=vllm",
        "--set",
        "generate.finetuned_weights=adapter",
        "--set",
        "generate.vllm_engine_args={gpu_memory_utilization: 0.3, enforce_eager: true}",
    )
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["model"], []).append(row)
    assert sorted(by_variant) == ["base", "finetuned"]
    assert len(by_variant["base"]) == len(by_variant["finetuned"]) > 0
    assert all(r["completion_tokens"] > 0 and r["finish_reason"] in ("stop", "length") for r in rows)
    manifest = json.loads((out / "_SUCCESS").read_text())
    finetuned = next(v for v in manifest["config"]["variants"] if v["name"] == "finetuned")
    assert finetuned["adapter"] and finetuned["adapter"].rstrip("/").endswith("adapter")  # LoRA, not merged


@pytest.mark.gpu
def test_deepspeed_zero3_on_two_gpus(cuda, tmp_path, format_output):
    if cuda < 2:
        pytest.skip(f"DeepSpeed ZeRO-3 over 2 GPUs needs 2 CUDA devices, this machine has {cuda}")
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (the train extra has it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "cmv_core.cli", "train", "--input", format_output, "--output", str(out), "--config", TINY]
    cmd += ["--set", "train.deepspeed=zero3", "--set", "train.max_steps=2", "--set", "train.precision=bf16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["deepspeed"] == "zero3.json" and metrics["global_step"] == 2
    shards = {p.name for p in (out / "checkpoints" / "checkpoint-2" / "global_step2").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards
    assert math.isfinite(metrics["final_eval_loss"])


def test_the_gpu_benchmark_helpers_build_llama_1b_and_measure(tiny_model_dir, tmp_path):
    """On CPU: the 1B model of the GPU test, built on the meta device (no memory), has Llama-3.2-1B's size;
    MFU and the data size follow their formulas; the synthetic format output is a valid stage output."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cmv_core import storage

    config = bench_train.llama_1b_config(AutoTokenizer.from_pretrained(tiny_model_dir))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 1_235_814_400  # Llama-3.2-1B, tied embedding counted once
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (16, 2048, 8)
    assert bench_train.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_train.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_train.peak_tflops("Some GPU") is None and bench_train.peak_tflops("Some GPU", 100.0) == 100.0
    assert bench_train.mfu(6, n_params, 10_000, 989.0) == pytest.approx(6 * n_params * 1e4 / 989e12)
    assert bench_train.gpu_data_size(6, 4, 1024, 700) == int(6 * 4 * 1024 / 1.3 / 700 * 1.3) + 64
    fmt = bench_train.write_data(str(tmp_path / "format"), n_train=5, n_val=2, mean_words=40)
    manifest = storage.require_success(fmt)
    assert manifest["summary"] == {"train": 5, "val": 2}
    assert len((tmp_path / "format" / "train.jsonl").read_text().splitlines()) == 5
    settings = bench_train.gpu_train_settings(6, 4, 1024)
    assert (settings["max_steps"], settings["precision"], settings["packing"]) == (6, "bf16", True)
