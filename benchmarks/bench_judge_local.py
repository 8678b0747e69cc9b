"""The local judge (embedded SmolLM2-135M, CPU): one call at a time vs micro-batched, in one run.

    python benchmarks/bench_judge_local.py              # the demo's judge plan on the bundled sample
    python benchmarks/bench_judge_local.py --items 4    # quicker

Runs clean and format of the bundled sample with the demo recipe (into a temp dir), writes
generations for two stand-in variants (parts of the human reply: realistic lengths, no model
needed), plans the demo's judge calls (configs/demo.yaml judge section) and answers the same calls
three ways through LocalBackend (cmv_core/judge/backends/local.py) and the judge's real scheduler (run_calls):
- one at a time (judge.local_batch_size: 1);
- batched in plan order, any calls of one form together (how it batched before the calls that share
  a post were grouped; a patch in this process only);
- as shipped: calls of one post in flight together, the shared post encoded once per batch.
Prints wall time, the tokens the model was fed and the forward passes, and each one's ratio to
one-at-a-time. Answers are checked to agree (same verdict text) across the three.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmv_core import storage  # noqa: E402
from cmv_core.config import load_recipe, section  # noqa: E402
from cmv_core.judge.backends.local import LocalBackend  # noqa: E402
from cmv_core.judge.calls import run_calls  # noqa: E402
from cmv_core.judge.config import JudgeConfig  # noqa: E402
from cmv_core.judge.inputs import load_inputs  # noqa: E402
from cmv_core.judge.plan import plan_calls  # noqa: E402


class NoCache:
    def get(self, key):
        return None

    def put(self, key, value):
        pass

    def take_batch_loaded(self, key):
        return False


def inputs(root: Path) -> tuple[str, str]:
    recipe = str(REPO / "configs" / "demo.yaml")
    for stage, extra in (
        ("clean", ["--input", str(REPO / "cmv_core" / "data" / "sample_cmv.jsonlist")]),
        ("format", ["--input", str(root / "clean")]),
    ):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cmv_core.cli",
                stage,
                *extra,
                "--output",
                str(root / stage),
                "--config",
                recipe,
                "--log-level",
                "WARNING",
            ],
            check=True,
            cwd=REPO,
        )
    gen = str(root / "generate")
    run = storage.begin_stage("generate", gen, inputs=[str(root / "format")], config={}, run_id="bench")
    rows = []
    for ex in storage.read_jsonl(str(root / "format" / "test.jsonl")):
        human = ex["messages"][-1]["content"]
        for variant, text in (("base", human[:300]), ("finetuned", human[-300:])):
            rows.append(
                {
                    "id": ex["id"],
                    "thread_id": ex["thread_id"],
                    "model": variant,
                    "messages": ex["messages"][:-1],
                    "response": text,
                    "finish_reason": "stop",
                }
            )
    storage.write_jsonl(storage.join(gen, "generations.jsonl"), rows)
    storage.finish_stage(run, {"rows": len(rows)})
    return gen, str(root / "format")


def answer(calls, cfg, mode: str) -> tuple[float, dict, list[str]]:
    backend = LocalBackend(cfg)
    if mode == "plan order":
        backend.call_order = lambda calls: list(range(len(calls)))
        backend._next_batch = lambda: [q for q in backend._queue if q[1] == backend._queue[0][1]][
            : cfg.local_batch_size
        ]
    fed = {"tokens": 0, "passes": 0}
    forward = backend.model.forward

    def counted(*args, **kwargs):
        fed["tokens"] += kwargs["input_ids"].numel()
        fed["passes"] += 1
        return forward(*args, **kwargs)

    backend.model.forward = counted
    started = time.perf_counter()
    results = asyncio.run(run_calls(calls, backend=backend, cache=NoCache(), cfg=cfg))
    return time.perf_counter() - started, fed, [r.get("raw") or json.dumps(r.get("verdict")) for r in results]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=8, help="test prompts judged (the demo: 8)")
    args = ap.parse_args()
    recipe = load_recipe(
        str(REPO / "configs" / "demo.yaml"),
        [f"judge.max_items={args.items}", "judge.comparisons=[[finetuned, base], [finetuned, human], [base, human]]"],
    )
    cfg = section(recipe, "judge", JudgeConfig)
    with tempfile.TemporaryDirectory(prefix="cmv-bench-judge-local-") as tmp:
        gen, data = inputs(Path(tmp))
        items, pairs = load_inputs(gen, data, cfg)
        calls, _, _ = plan_calls(items, pairs, cfg)
        print(
            f"{len(calls)} judge calls ({len(items)} prompts, {len(pairs)} calibration pairs), "
            f"load average {__import__('os').getloadavg()[0]:.2f}",
            flush=True,
        )
        runs = {}
        for mode, batch in (
            ("one at a time", 1),
            ("plan order", cfg.local_batch_size),
            ("shared post", cfg.local_batch_size),
        ):
            mode_cfg = JudgeConfig(**{**cfg.__dict__, "local_batch_size": batch})
            runs[mode] = answer(calls, mode_cfg, mode)
    base_s, base_fed, base_answers = runs["one at a time"]
    print(f"{'mode':<16}{'wall s':>8}{'x':>7}{'tokens fed':>12}{'passes':>8}  answers as one at a time")
    for mode, (wall, fed, answers) in runs.items():
        same = sum(a == b for a, b in zip(answers, base_answers))
        print(
            f"{mode:<16}{wall:>8.1f}{wall / base_s:>7.2f}{fed['tokens']:>12}{fed['passes']:>8}  {same}/{len(answers)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
