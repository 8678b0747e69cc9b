"""Batched vs one-prompt-at-a-time generation on CPU with the demo model (embedded SmolLM2-135M-Instruct).

Both runs go through the generate stage's own transformers backend (same
prompts, same greedy settings), measured in one process, one after the other.
Throughput is completion tokens per second (real tokens only: padding after a
finished reply is not counted). Target: batched >= 3x one-at-a-time.

    make bench-generate
    .venv/bin/python benchmarks/bench_generate.py --prompts 16 --batch-size 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmv_core import generation as gen  # noqa: E402
from cmv_core.models import EMBEDDED_DEFAULT  # noqa: E402

TOPICS = [
    "cats make better pets than dogs",
    "remote work is worse for junior engineers",
    "tipping should be abolished",
    "cities should ban cars from their centres",
    "pineapple belongs on pizza",
    "space exploration is a waste of money",
    "exams measure memory, not understanding",
    "nuclear power is the best answer to climate change",
    "social media does more harm than good",
    "homework should be banned in primary schools",
    "voting should be compulsory",
    "the four-day work week should be the norm",
    "zoos should not exist",
    "college should be free",
    "self-driving cars will never be safe enough",
    "daylight saving time should be abolished",
]
REASON = (
    "I have thought about this for a long time and every argument I hear against it seems weak to me. "
    "People mostly defend the status quo out of habit, and the evidence I have seen points the other way. "
)


def prompts(n: int) -> list[gen.Prompt]:
    """CMV-like prompts of varied length (1 to 4 paragraphs of reasons), like real posts."""
    out = []
    for i in range(n):
        body = f"CMV: {TOPICS[i % len(TOPICS)]}.\n\n" + REASON * (1 + i % 4)
        out.append(gen.Prompt(id=f"b{i}", thread_id=f"b{i}", messages=[{"role": "user", "content": body}]))
    return out


def timed(config: gen.GenerateConfig, batch: list[gen.Prompt]) -> tuple[float, int]:
    variant = gen.Variant("base", config.variants[0]["model"])
    with gen.open_backend([variant], config) as generate:
        generate(variant, batch[:1], 0)  # warm-up: first-call allocations, kernel selection
        started = time.perf_counter()
        replies = generate(variant, batch, 0)
        seconds = time.perf_counter() - started
    return seconds, sum(r.completion_tokens for r in replies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    batch = prompts(args.prompts)
    common = dict(max_new_tokens=args.max_new_tokens, device="cpu", variants=[{"name": "base", "model": args.model}])
    print(f"model {args.model}, {args.prompts} prompts, {args.max_new_tokens} new tokens max, greedy, "
          f"CPU with {torch.get_num_threads()} threads")
    one_s, one_tokens = timed(gen.GenerateConfig(batch_size=1, **common), batch)
    print(f"one at a time     : {one_s:7.2f} s  {one_tokens:5d} tokens  {one_tokens / one_s:7.1f} tokens/s")
    bat_s, bat_tokens = timed(gen.GenerateConfig(batch_size=args.batch_size, **common), batch)
    print(f"batched (size {args.batch_size:3d}): {bat_s:7.2f} s  {bat_tokens:5d} tokens  {bat_tokens / bat_s:7.1f} tokens/s")
    ratio = (bat_tokens / bat_s) / (one_tokens / one_s)
    print(f"throughput ratio batched / one-at-a-time: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
