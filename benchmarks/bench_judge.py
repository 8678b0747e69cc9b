"""Judge throughput against a local OpenAI-compatible server with fixed latency.

Runs N judgments (default 500) through the judge's real call path (openai.AsyncOpenAI, the
bounded-concurrency scheduler, the persistent cache, verdict parsing) against
tests/fake_openai_server.py in its own process, answering every request after --latency-ms.
Prints the wall time beside the ideal N * latency / concurrency measured in the same run, and
their ratio (target: within 1.1x, issue 24), at each concurrency given (default 16 and 32), and beside
a floor measured in the same run: the same request bodies posted by a bare aiohttp client at the same
concurrency (no judge, no openai client), which shows how much of the gap to the ideal is the machine
(the fake server's own CPU, other load) rather than the judge. A second pass
over the same calls shows the cache (no requests). Then the same calls through the Batch API
backend (openai-batch: upload, create, poll, download, load into the cache, answer from it):
its submit-to-loaded overhead, the time the pipeline itself adds on top of the batch's own
processing. Each sync pass runs on every client transport given (aiohttp, the default, and httpx).
Usage: python benchmarks/bench_judge.py [--n 500] [--concurrency 16,32] [--latency-ms 100]
[--transport aiohttp,httpx]
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

from cmv_core.judge.backends.openai import OpenAIBackend  # noqa: E402
from cmv_core.judge.cache import ResponseCache  # noqa: E402
from cmv_core.judge.calls import run_calls  # noqa: E402
from cmv_core.judge.config import JudgeConfig  # noqa: E402
from cmv_core.judge.plan import make_backend  # noqa: E402
from cmv_core.judge.prompts import single_form, single_messages  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--concurrency", default="16,32", help="comma-separated concurrency levels")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument(
        "--transport",
        default="aiohttp,httpx",
        help="comma-separated judge.http_transport values, each run at every concurrency",
    )
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fake_openai_server.py"), "--latency-ms", str(args.latency_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    failures = 0
    try:
        port = int(server.stdout.readline().split()[1])
        for transport in args.transport.split(","):
            for concurrency in [int(c) for c in str(args.concurrency).split(",")]:
                failures += sync_pass(port, args.n, concurrency, args.latency_ms, transport)
        failures += batch_pass(port, args.n)
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    return 1 if failures else 0


def make_calls(cfg, n):
    form = single_form(cfg.criteria)
    post = [{"role": "user", "content": "CMV: benchmarks should measure one thing at a time.\n\n" + "Because. " * 200}]
    return [
        (
            single_messages(post, f"Reply number {i}. " + "An argument. " * 80, cfg.criteria, cfg.max_text_chars),
            form,
        )
        for i in range(n)
    ]


def sync_pass(port: int, n: int, concurrency: int, latency_ms: float, transport: str) -> int:
    cfg = JudgeConfig(
        backend="openai",
        model="gpt-4o-mini",
        base_url=f"http://127.0.0.1:{port}/v1",
        concurrency=concurrency,
        max_retries=2,
        timeout_s=30,
        http_transport=transport,
    )
    calls = make_calls(cfg, n)

    async def judge_all(cache, timed: list | None = None):
        # Building the client (its TLS context loads the CA bundle: ~0.2 s once per process) is set-up, as
        # imports are, not judging: the clock starts after it.
        backend = OpenAIBackend(cfg)
        if timed is not None:
            timed += [time.perf_counter(), time.process_time()]
        try:
            return await run_calls(calls, backend=backend, cache=cache, cfg=cfg)
        finally:
            await backend.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        import openai  # noqa: F401  (import time is not judging time)

        cache = ResponseCache(str(Path(tmp) / "cache"))
        start: list = []
        results = asyncio.run(judge_all(cache, start))
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        cache.close()
        ok = sum(r["status"] == "ok" for r in results)
        cache2 = ResponseCache(str(Path(tmp) / "cache"))
        t1 = time.perf_counter()
        again = asyncio.run(judge_all(cache2))
        cached_wall = time.perf_counter() - t1
        cache2.close()

    ideal = n * latency_ms / 1000.0 / concurrency
    print(
        f"judgments: {n} ({ok} ok), concurrency {concurrency}, server latency {latency_ms:.0f} ms, "
        f"transport {transport}"
    )
    print(f"wall time: {wall:.2f} s; ideal (n x latency / concurrency): {ideal:.2f} s")
    floor = floor_pass(port, calls, cfg, concurrency)
    print(f"ratio wall/ideal: {wall / ideal:.2f}x (target <= 1.1x)")
    print(
        f"floor (bare aiohttp, same bodies and concurrency): {floor:.2f} s, {floor / ideal:.2f}x ideal; "
        f"judge/floor {wall / floor:.2f}x"
    )
    # The client's own CPU per call bounds the useful concurrency against a fast server: once
    # cpu/call x concurrency nears the latency, the run is CPU-bound, not scheduler-bound.
    print(f"judge-side CPU: {cpu:.2f} s, {1000 * cpu / n:.1f} ms per call")
    print(f"rerun from cache: {cached_wall:.2f} s, {sum(r['new_calls'] for r in again)} new request(s)")
    print()
    return 0 if ok == n else 1


def floor_pass(port: int, calls: list, cfg: JudgeConfig, concurrency: int) -> float:
    """Wall time of the same request bodies through a bare aiohttp session, ``concurrency`` at once."""
    import json

    import aiohttp

    from cmv_core.judge.backends.openai import request_body

    bodies = [json.dumps(request_body(cfg, m, f)).encode() for m, f in calls]

    async def go() -> float:
        sem = asyncio.Semaphore(concurrency)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as session:

            async def one(body: bytes) -> None:
                async with sem, session.post(url, data=body) as resp:
                    json.loads(await resp.read())

            t0 = time.perf_counter()
            await asyncio.gather(*(one(b) for b in bodies))
            return time.perf_counter() - t0

    return asyncio.run(go())


def batch_pass(port: int, n: int) -> int:
    """The Batch backend end to end; the fake processes a batch when first polled, so everything
    measured is the pipeline's own overhead (JSONL build, upload, create, poll, download, load)."""
    cfg = JudgeConfig(
        backend="openai-batch",
        model="gpt-4o-mini",
        base_url=f"http://127.0.0.1:{port}/v1",
        max_retries=2,
        timeout_s=60,
        batch_poll_s=0.05,
    )
    calls = make_calls(cfg, n)

    async def judge_all(cache):
        backend = make_backend(cfg)
        try:
            t0 = time.perf_counter()
            await backend.prefetch(calls, cache)
            loaded = time.perf_counter() - t0
            results = await run_calls(calls, backend=backend, cache=cache, cfg=cfg)
            return results, loaded, time.perf_counter() - t0, backend.stats
        finally:
            await backend.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        cache = ResponseCache(str(Path(tmp) / "cache"))
        results, loaded, total, stats = asyncio.run(judge_all(cache))
        cache.close()
    ok = sum(r["status"] == "ok" for r in results)
    print(f"batch backend: {n} judgments ({ok} ok) in {stats['batches']} batch(es), {stats['requests']} request(s)")
    print(
        f"submit-to-loaded: {loaded:.2f} s (the fake server answers the batch on its first poll, "
        "so this is all overhead of ours and of the transfers)"
    )
    print(
        f"submit-to-judgments (answers read back from the cache): {total:.2f} s, {1000 * total / n:.1f} ms per judgment"
    )
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
