"""The OpenAI Batch API backend against the fake server's /v1/files and /v1/batches.

judgments.jsonl must be byte-identical to the synchronous path (re-asks after unparseable answers
included, which go in a follow-up batch), also when the stage is killed between submitting the
batch and downloading its results, and no batch is ever submitted twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import CONFIGS, REPO
from fake_openai_server import FakeOpenAI, Reply, completion
from test_judge import make_inputs, replies_shown, smart_judge

from cmv_core import storage
from cmv_core.judge import stage as judging
from cmv_core.judge.config import JudgeConfig

PRICES = {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "gpt-4o-mini@batch": {"input": 0.15, "output": 0.60}}


def flaky_judge(body, n):
    """smart_judge, except that the first ask about BASE reply 1 is not JSON (re-asked)."""
    if replies_shown(body) == ("BASE reply 1",) and len(body["messages"]) == 2:
        return Reply(body=completion("five, I think"))
    return smart_judge(body, n)


def cfg(srv, backend, **kw):
    return JudgeConfig(
        backend=backend,
        model="gpt-4o-mini",
        base_url=srv.base_url,
        concurrency=4,
        max_retries=2,
        timeout_s=5.0,
        bootstrap_samples=100,
        batch_poll_s=0.01,
        prices=PRICES,
        validate_instruments=False,
        length_probe_items=0,
        nondelta_reference=False,
        **kw,
    )


def test_batch_path_gives_byte_identical_judgments_with_a_follow_up_batch(tmp_path):
    gen, fmt = make_inputs(tmp_path)
    with FakeOpenAI(flaky_judge) as srv:
        judging.run_judge(gen, fmt, str(tmp_path / "sync"), cfg(srv, "openai"))
        sync_count = srv.count
        srv.reset()
        srv.batch_polls = 3
        judging.run_judge(gen, fmt, str(tmp_path / "batch"), cfg(srv, "openai-batch"))
        # round 1: every call; round 2: the one re-ask; nothing went to the synchronous endpoint
        assert len(srv.batches) == 2
        sizes = [b["request_counts"]["total"] for b in srv.batches.values()]
        assert sizes == [sync_count - 1, 1]
        assert all(
            b["endpoint"] == "/v1/chat/completions" and b["completion_window"] == "24h" for b in srv.batches.values()
        )
        assert srv.count == sync_count
    sync = (tmp_path / "sync" / "judgments.jsonl").read_bytes()
    batch = (tmp_path / "batch" / "judgments.jsonl").read_bytes()
    assert sync == batch
    assert not (tmp_path / "batch" / "cache" / "batch_state.json").exists()


def test_killed_while_the_batch_runs_resumes_by_polling_never_resubmits(tmp_path):
    gen, fmt = make_inputs(tmp_path)
    out = tmp_path / "batch"
    common = [
        "judge",
        "--generations",
        gen,
        "--data",
        fmt,
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--set",
        "judge.model=gpt-4o-mini",
        "--set",
        "judge.batch_poll_s=0.05",
        "--set",
        "judge.validate_instruments=false",
        "--set",
        "judge.length_probe_items=0",
        "--set",
        "judge.nondelta_reference=false",
        # one price for both paths, so that the judgments (costs included) can be identical
        "--set",
        "judge.prices.gpt-4o-mini.input=0.15",
        "--set",
        "judge.prices.gpt-4o-mini.output=0.6",
        "--set",
        "judge.prices.gpt-4o-mini@batch.input=0.15",
        "--set",
        "judge.prices.gpt-4o-mini@batch.output=0.6",
    ]
    env = {**os.environ, "OPENAI_API_KEY": "sk-batch-test"}
    with FakeOpenAI(smart_judge) as srv:
        url = ["--set", f"judge.base_url={srv.base_url}"]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cmv_core.cli",
                *common,
                *url,
                "--set",
                "judge.backend=openai",
                "--output",
                str(tmp_path / "sync"),
            ],
            check=True,
            env=env,
            cwd=REPO,
            capture_output=True,
        )
        srv.reset()
        srv.hold_batches = True
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cmv_core.cli",
                *common,
                *url,
                "--set",
                "judge.backend=openai-batch",
                "--output",
                str(out),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        state = out / "cache" / "batch_state.json"
        deadline = time.monotonic() + 60
        while not (state.exists() and srv.batches) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.exists() and len(srv.batches) == 1
        time.sleep(0.2)  # polling
        proc.kill()
        proc.wait()
        assert not (out / "_SUCCESS").exists() and srv.count == 0

        srv.hold_batches = False
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cmv_core.cli",
                *common,
                *url,
                "--set",
                "judge.backend=openai-batch",
                "--output",
                str(out),
            ],
            check=True,
            env=env,
            cwd=REPO,
            capture_output=True,
        )
        assert len(srv.batches) == 1  # resumed by polling the same batch
        assert (out / "_SUCCESS").exists() and not state.exists()
    assert (out / "judgments.jsonl").read_bytes() == (tmp_path / "sync" / "judgments.jsonl").read_bytes()
    report = storage.read_json(str(out / "report.json"))
    assert report["usage"]["new_calls"] > 0 and report["failures"]["failed_calls"] == 0
