"""The judge against a real vLLM server (issue 25, What must work 3 and 4): the whole ``cmv judge`` on
loopback at concurrency 8 with a timeout that a fixed client runs past (vLLM on 2 CPU cores generates
about 15 tokens/s in all: 8 answers in flight take about a minute), then the same requests through
vLLM's own batch runner (``python -m vllm.entrypoints.openai.run_batch``) and the judge's batch path.

The server is the session's ``vllm_server`` (tests/engines/conftest.py). One online run serves both
tests (module fixture): it is the slow part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_judge import INSTRUCTION, write_stage_outputs

from cmv_core import storage

pytestmark = pytest.mark.engines

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TIMEOUT_S = 15  # under a call's time at concurrency 8 on this server: a fixed client times out


POSTS = [
    (
        "CMV: Cities should ban cars from their historic centres",
        "Narrow medieval streets were never built for traffic. Cars make them loud, dangerous and polluted, "
        "and the shops there would do better with more people walking past.",
    ),
    (
        "CMV: Homework in primary school does more harm than good",
        "Young children learn best through play and sleep. Homework takes time from both, widens the gap "
        "between children whose parents can help and those whose parents cannot, and teaches them to hate school.",
    ),
    (
        "CMV: Tipping should be replaced by higher wages",
        "Tipping makes a worker's income depend on a customer's mood, invites discrimination and hides the "
        "real price of a meal. Paying staff properly and raising menu prices would be fairer to everyone.",
    ),
]
REPLIES = {
    "base": "I disagree with you. There are many reasons. It is complicated and people have different views.",
    "finetuned": "You say {topic}, but consider the people it leaves out: delivery drivers, the elderly and "
    "disabled residents depend on access. A partial ban with exemptions keeps most of the benefit you want.",
    "human": "Have you looked at what happened where this was tried? The evidence is mixed: some places "
    "gained, others lost business, so the details of how it is done matter more than the principle.",
    "win": "The strongest case against your view is that it ignores the costs to the people you want to help; "
    "here is a specific example that changes the balance.",
    "lose": "No. You are wrong and this is a silly view.",
}


def cmv_inputs(root: Path) -> tuple[str, str]:
    """Format and generate outputs (test.jsonl, pairs.jsonl, generations.jsonl) for three short posts."""
    from cmv_core import storage

    fmt, gen = str(root / "format"), str(root / "generate")
    run = storage.begin_stage(
        "format",
        fmt,
        inputs=[],
        config={"format": {"instruction": INSTRUCTION, "instruction_role": "user"}},
        run_id="t",
    )
    tests, pairs, gens = [], [], []
    for i, (title, body) in enumerate(POSTS):
        prompt = [{"role": "user", "content": f"{INSTRUCTION}\n\n{title}\n\n{body}"}]
        tid = f"t{i}"
        tests.append(
            {
                "id": f"{tid}:c{i}",
                "thread_id": tid,
                "messages": prompt + [{"role": "assistant", "content": REPLIES["human"]}],
            }
        )
        pairs.append(
            {
                "pair_id": f"{tid}:c{i}",
                "thread_id": tid,
                "prompt": prompt,
                "winner": REPLIES["win"],
                "loser": REPLIES["lose"],
            }
        )
        for variant in ("base", "finetuned"):
            text = REPLIES[variant].format(topic=title.removeprefix("CMV: ").lower())
            gens.append(
                {
                    "id": f"{tid}:c{i}",
                    "thread_id": tid,
                    "model": variant,
                    "messages": prompt,
                    "response": text,
                    "finish_reason": "stop",
                    "prompt_tokens": 60,
                    "completion_tokens": 40,
                }
            )
    return write_stage_outputs(run, fmt, gen, tests, pairs, gens)


def run_cmv(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cmv_core.cli", *args], capture_output=True, text=True, timeout=3600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cmv {args[0]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def judge_cmd(gen: str, fmt: str, out, server, tokenizer: str, *extra: str) -> list[str]:
    sets = {
        "judge.backend": "openai",
        "judge.model": server.model,
        "judge.base_url": server.base_url,
        "judge.concurrency": "8",
        "judge.timeout_s": str(TIMEOUT_S),
        "judge.max_retries": "3",
        "judge.response_format": "json_schema",
        "judge.logprobs": "true",
        "judge.api_seed": "0",
        "judge.temperature": "0",
        "judge.token_limit_param": "max_completion_tokens",
        "judge.max_tokens": "400",
        "judge.tokenizer": tokenizer,
        # scores, pairwise with the swap, calibration; the rest of the defaults cost calls, not coverage here
        "judge.comparisons": "[[finetuned, base]]",
        "judge.validate_instruments": "false",
        "judge.length_probe_items": "0",
        "judge.nondelta_reference": "false",
        "judge.human_replies": "0",
        "judge.max_items": "3",
        "judge.max_calibration_pairs": "2",
        "judge.bootstrap_samples": "200",
        # SmolLM2-135M's rationale sometimes loops to max_tokens (an unparseable verdict, a model's failing,
        # counted apart as unparseable); the transport is what is tested here: no re-asks, and no threshold
        "judge.parse_retries": "0",
        "judge.max_failed_fraction": "1.0",
    }
    argv = ["judge", "--generations", gen, "--data", fmt, "--output", str(out), "--config", str(CONFIGS / "tiny.yaml")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    return argv + list(extra)


@pytest.fixture(scope="module")
def online(vllm_server, smollm2_dir, tmp_path_factory):
    """Dry run, then the whole judge against the server: (inputs, output dir, dry-run estimate, seconds)."""
    root = tmp_path_factory.mktemp("judge-vllm")
    gen, fmt = cmv_inputs(root)
    out = root / "online"
    dry = run_cmv(*judge_cmd(gen, fmt, out, vllm_server, smollm2_dir), "--dry-run")
    estimate = json.loads(dry.stdout.strip().splitlines()[-1])
    t0 = time.monotonic()
    proc = run_cmv(*judge_cmd(gen, fmt, out, vllm_server, smollm2_dir), check=False)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return gen, fmt, out, estimate, seconds


def test_judge_against_vllm_zero_failures_few_retries_and_provenance(online, vllm_server):
    gen, fmt, out, estimate, seconds = online
    manifest = storage.require_success(str(out))
    summary = manifest["summary"]
    transport = summary["transport"]
    print(f"\njudge vs vLLM: {summary['calls']} calls in {seconds:.0f} s; transport {transport}")
    failures = storage.read_json(storage.join(str(out), "report.json"))["failures"]
    # no call failed in transport (timeouts, 429/5xx, refused parameters): every failed call is a verdict
    # the model did not finish (unparseable), not a lost one
    assert summary["failed_calls"] == failures["unparseable"], failures
    calls = [c for r in storage.read_jsonl(storage.join(str(out), "judgments.jsonl")) for c in r.get("orders", [r])]
    assert not [c for c in calls if c["status"] == "error"]
    assert summary["new_calls"] >= 10
    assert transport["retried_calls"] < 0.10 * summary["new_calls"]

    rows = list(storage.read_jsonl(storage.join(str(out), "judgments.jsonl")))
    kinds = {r["kind"] for r in rows}
    assert {"single", "pairwise", "calibration"} <= kinds
    pairs = [r for r in rows if r["kind"] == "pairwise"]
    assert pairs and all(len(r["orders"]) == 2 for r in pairs)  # both orders (the swap)
    singles = [r for r in rows if r["kind"] == "single" and r["status"] == "ok"]
    # logprobs came back: a probability-weighted score beside the sampled one
    assert singles and all(r["weighted_scores"] and None not in r["weighted_scores"].values() for r in singles)

    report = storage.read_json(storage.join(str(out), "report.json"))
    server = report["judge_server"]
    assert server["server"] == "vLLM" and server["version"] == vllm_server.version
    assert [m["id"] for m in server["models"]] == [vllm_server.model]
    assert not server.get("adapted")  # vLLM takes every parameter the judge sends
    md = storage.read_text(storage.join(str(out), "report.md"))
    assert f"judge server: vLLM {vllm_server.version}" in md and f"`{vllm_server.model}`" in md

    # The dry run's prompt tokens (the served model's tokenizer, its chat template) against the server's usage
    usage = report["usage"]
    err = abs(estimate["est_prompt_tokens"] - usage["prompt_tokens"]) / usage["prompt_tokens"]
    total_est = estimate["est_prompt_tokens"] + estimate["est_completion_tokens"]
    total = usage["prompt_tokens"] + usage["completion_tokens"]
    print(
        f"dry run: prompt tokens {estimate['est_prompt_tokens']} vs {usage['prompt_tokens']} reported ({err:.1%}); "
        f"all tokens {total_est} vs {total} ({abs(total_est - total) / total:.1%})"
    )
    assert err < 0.10


def test_vllm_run_batch_output_ingested_gives_the_online_verdicts(online, vllm_server, smollm2_dir, tmp_path):
    """The judge's batch input file run by vLLM's own batch runner; the judge reads its output file."""
    gen, fmt, online_out, _, _ = online
    out = tmp_path / "batch"
    cmd = judge_cmd(gen, fmt, out, vllm_server, smollm2_dir, "--set", "judge.backend=openai-batch")
    cmd += ["--set", "judge.batch_runner=files"]
    runs = 0
    for _ in range(4):
        proc = run_cmv(*cmd, check=False)
        if proc.returncode == 0:
            break
        assert "run_batch" in proc.stderr, proc.stderr[-3000:]
        inp = proc.stderr.split(" written to ")[1].split(";")[0]
        batch = subprocess.run(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.run_batch",
                "-i",
                inp,
                "-o",
                inp.replace(".input.jsonl", ".output.jsonl"),
                "--model",
                smollm2_dir,
                "--served-model-name",
                vllm_server.model,
                "--max-model-len",
                "4096",
                "--seed",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
        )
        assert batch.returncode == 0, batch.stderr[-3000:]
        runs += 1
    assert proc.returncode == 0 and runs >= 1
    verdicts = {}
    for name in ("online", "batch"):
        path = storage.join(str(online_out if name == "online" else out), "judgments.jsonl")
        verdicts[name] = {r["id"]: (r.get("scores"), r.get("outcome")) for r in storage.read_jsonl(path)}
    same = sum(verdicts["online"][k] == verdicts["batch"].get(k) for k in verdicts["online"])
    print(f"\nrun_batch: {runs} batch file(s); {same}/{len(verdicts['online'])} verdicts as online")
    assert verdicts["batch"] == verdicts["online"]
