"""Generation tokens/s on vLLM vs the transformers backend: same prompts, same greedy settings, one run.

Both go through the generate stage's own backends (cmv_core.generate.backends.open_backend) on the embedded
SmolLM2-135M-Instruct: the base model, then (``--lora``) a LoRA adapter served through ``LoRARequest`` on vLLM
and merged on transformers. Throughput is completion tokens per second of generation (engine start and model
load excluded, printed apart). Needs vLLM: run from .venv-engines (make bench-engines).

On a CPU the ratio depends on the load: vLLM's CPU backend keeps a core for its own scheduler process and
prefers tcmalloc and Intel OpenMP preloaded (its CPU install docs); on a GPU vLLM is the speed path.

    make bench-engines
    .venv-engines/bin/python benchmarks/bench_engines.py --prompts 8 --max-new-tokens 32 --lora
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import prompts  # noqa: E402

from cmv_core.generate.backends import open_backend  # noqa: E402
from cmv_core.generate.config import GenerateConfig, Variant  # noqa: E402
from cmv_core.models import EMBEDDED_DEFAULT, resolve_model  # noqa: E402


def random_adapter(model_dir: str, out: str) -> str:
    """A seeded LoRA (r=16, all-linear) that changes the replies: what is timed is serving one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    peft_model.save_pretrained(out)
    return out


def _timed(groups: list[list[Variant]], config: GenerateConfig, batch) -> dict:
    """Open each group's backend once, then time generation per variant: start seconds, {variant: (tokens, s)}."""
    start_s, out = 0.0, {}
    for group in groups:
        t0 = time.perf_counter()
        with open_backend(group, config) as generate:
            start_s += time.perf_counter() - t0
            for v in group:
                t1 = time.perf_counter()
                replies = generate(v, batch, 0)
                out[v.name] = (sum(r.completion_tokens for r in replies), time.perf_counter() - t1)
    return {"start_s": start_s, "variants": out}


def measure(backend: str, variants: list[Variant], config: GenerateConfig, batch) -> dict:
    """vLLM: one engine for every variant (LoRARequest); transformers: one model per variant (adapter merged)."""
    config = dataclasses.replace(config, backend=backend)
    groups = [variants] if backend == "vllm" else [[v] for v in variants]
    return _timed(groups, config, batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lora", action="store_true", help="also a LoRA variant (vLLM: LoRARequest; HF: merged)")
    parser.add_argument("--dtype", default="float32", help="both backends (vLLM's CPU build: float32 or bfloat16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # vLLM's CPU backend otherwise reserves gpu_memory_utilization (0.92) of the machine's memory for itself
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    model_dir = resolve_model(EMBEDDED_DEFAULT)
    variants = [Variant("base", EMBEDDED_DEFAULT)]
    tmp = tempfile.TemporaryDirectory(prefix="bench-engines-")
    if args.lora:
        variants.append(Variant("lora", EMBEDDED_DEFAULT, random_adapter(model_dir, tmp.name)))
    config = GenerateConfig(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.prompts,
        dtype=args.dtype,
        device="cpu",
        vllm_engine_args={"dtype": args.dtype},
        max_model_len=2048,
    )
    batch = prompts(args.prompts)
    results = {b: measure(b, variants, config, batch) for b in ("transformers", "vllm")}
    print(f"{args.prompts} prompts x {args.max_new_tokens} new tokens max, greedy, {args.dtype}, one batch each")
    for backend, r in results.items():
        print(f"  {backend:12s} start/load {r['start_s']:6.1f} s")
    for v in variants:
        (ht, hs), (vt, vs) = results["transformers"]["variants"][v.name], results["vllm"]["variants"][v.name]
        print(
            f"  {v.name:5s} transformers {ht / hs:7.1f} tok/s ({ht} tokens)   vllm {vt / vs:7.1f} tok/s ({vt} tokens)"
            f"   vllm/transformers {vt / vs / (ht / hs):.2f}x"
        )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
