"""Judge throughput against a local OpenAI-compatible server with fixed latency.

Runs N judgments (default 500) through the judge's real call path (openai.AsyncOpenAI, the
bounded-concurrency scheduler, the persistent cache, verdict parsing) against
tests/fake_openai_server.py in its own process, answering every request after --latency-ms.
Prints the wall time beside the ideal N * latency / concurrency measured in the same run, and
their ratio (target: within 1.3x). A second pass over the same calls shows the cache (no
requests). Usage: python benchmarks/bench_judge.py [--n 500] [--concurrency 16] [--latency-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmv_core import judging  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_openai_server.py"),
                               "--latency-ms", str(args.latency_ms)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        cfg = judging.JudgeConfig(backend="openai", model="gpt-4o-mini", base_url=f"http://127.0.0.1:{port}/v1",
                                  concurrency=args.concurrency, max_retries=2, timeout_s=30)
        form = judging.single_form(cfg.criteria)
        post = [{"role": "user", "content": "CMV: benchmarks should measure one thing at a time.\n\n" + "Because. " * 200}]
        calls = [(judging.single_messages(post, f"Reply number {i}. " + "An argument. " * 80, cfg.criteria,
                                          cfg.max_text_chars), form) for i in range(args.n)]

        async def judge_all(cache):
            backend = judging.OpenAIBackend(cfg)
            try:
                return await judging.run_calls(calls, backend=backend, cache=cache, cfg=cfg)
            finally:
                await backend.aclose()

        with tempfile.TemporaryDirectory() as tmp:
            import openai  # noqa: F401  (import time is not judging time)

            cache = judging.ResponseCache(str(Path(tmp) / "cache"))
            t0, cpu0 = time.perf_counter(), time.process_time()
            results = asyncio.run(judge_all(cache))
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            cache.close()
            ok = sum(r["status"] == "ok" for r in results)
            cache2 = judging.ResponseCache(str(Path(tmp) / "cache"))
            t1 = time.perf_counter()
            again = asyncio.run(judge_all(cache2))
            cached_wall = time.perf_counter() - t1
            cache2.close()
    finally:
        server.stdin.close()
        server.wait(timeout=10)

    ideal = args.n * args.latency_ms / 1000.0 / args.concurrency
    print(f"judgments: {args.n} ({ok} ok), concurrency {args.concurrency}, server latency {args.latency_ms:.0f} ms")
    print(f"wall time: {wall:.2f} s; ideal (n x latency / concurrency): {ideal:.2f} s")
    print(f"ratio wall/ideal: {wall / ideal:.2f}x (target <= 1.3x)")
    # The client's own CPU per call (mostly the openai package's request building) bounds the
    # useful concurrency against a fast server: once cpu/call x concurrency nears the latency,
    # the run is CPU-bound, not scheduler-bound. Real APIs answer in seconds, not 100 ms.
    print(f"judge-side CPU: {cpu:.2f} s, {1000 * cpu / args.n:.1f} ms per call")
    print(f"rerun from cache: {cached_wall:.2f} s, {sum(r['new_calls'] for r in again)} new request(s)")
    return 0 if ok == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
