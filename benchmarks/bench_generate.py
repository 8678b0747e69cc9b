"""Batched vs one-prompt-at-a-time generation on CPU with the demo model (embedded SmolLM2-135M-Instruct).

Both runs go through the generate stage's own transformers backend (same
prompts, same greedy settings), measured in one process, one after the other.
Throughput is completion tokens per second (real tokens only: padding after a
finished reply is not counted). Target: batched >= 3x one-at-a-time.

    make bench-generate
    .venv/bin/python benchmarks/bench_generate.py --prompts 16 --batch-size 16 --max-new-tokens 64 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmv_core.generate.backends import open_backend  # noqa: E402
from cmv_core.generate.config import GenerateConfig, Prompt, Variant  # noqa: E402
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


def prompts(n: int) -> list[Prompt]:
    """CMV-like prompts of varied length (1 to 4 paragraphs of reasons), like real posts."""
    out = []
    for i in range(n):
        body = f"CMV: {TOPICS[i % len(TOPICS)]}.\n\n" + REASON * (1 + i % 4)
        out.append(Prompt(id=f"b{i}", thread_id=f"b{i}", messages=[{"role": "user", "content": body}]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best round of each mode counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    batch = prompts(args.prompts)
    variant = Variant("base", args.model)
    common = dict(max_new_tokens=args.max_new_tokens, device="cpu", variants=[{"name": "base", "model": args.model}])
    modes = {"one at a time": 1, f"batched (size {args.batch_size})": args.batch_size}
    print(
        f"model {args.model}, {args.prompts} prompts, up to {args.max_new_tokens} new tokens, greedy, "
        f"CPU with {torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds"
    )
    best: dict[str, tuple[float, int]] = {}
    with contextlib.ExitStack() as stack:
        backends = {
            name: stack.enter_context(open_backend([variant], GenerateConfig(batch_size=size, **common)))
            for name, size in modes.items()
        }
        for generate in backends.values():
            generate(variant, batch[:1], 0)  # warm-up: first-call allocations, kernel selection
        # Interleaved rounds, best of each: a machine shared with other jobs slows
        # some rounds down, and the two modes should see the same conditions.
        for r in range(args.rounds):
            for name, generate in backends.items():
                started = time.perf_counter()
                replies = generate(variant, batch, 0)
                seconds = time.perf_counter() - started
                tokens = sum(x.completion_tokens for x in replies)
                print(
                    f"round {r + 1} {name:20s}: {seconds:7.2f} s  {tokens:5d} tokens  {tokens / seconds:7.1f} tokens/s",
                    flush=True,
                )
                if name not in best or tokens / seconds > best[name][1] / best[name][0]:
                    best[name] = (seconds, tokens)
    (one_s, one_tokens), (bat_s, bat_tokens) = best.values()
    ratio = (bat_tokens / bat_s) / (one_tokens / one_s)
    print(
        f"throughput ratio batched / one-at-a-time: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
