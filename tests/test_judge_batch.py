"""The OpenAI Batch API backend against the fake server's /v1/files and /v1/batches.

judgments.jsonl must be byte-identical to the synchronous path (re-asks after unparseable answers
included, which go in a follow-up batch), also when the stage is killed between submitting the
batch and downloading its results, and no batch is ever submitted twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS, REPO
from fake_openai_server import FakeOpenAI, Reply, completion
from test_judge import make_inputs, replies_shown, smart_judge

from cmv_core import storage
from cmv_core.judge import stage as judging
from cmv_core.judge.config import JudgeConfig, JudgeFailed

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
        human_replies=0,  # the percentile's human grades: tests/test_percentile.py
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


# ---------------------------------------------------------------- failure paths, counted as online

SINGLES = dict(grade_human=False, pairwise=False, calibration=False, comparisons=[])


def broken_judge(state):
    """smart_judge, except that while ``state["broken"]`` FT reply 0 gets a 500 and FT reply 1 a 400."""

    def handler(body, n):
        shown = replies_shown(body)
        if state["broken"] and shown == ("FT reply 0",):
            return Reply(status=500, body={"error": {"message": "boom"}})
        if state["broken"] and shown == ("FT reply 1",):
            return Reply(status=400, body={"error": {"message": "bad line"}})
        return smart_judge(body, n)

    return handler


@pytest.mark.parametrize("failed_lines_to", ["error_file", "output"])
def test_non_200_lines_are_failed_calls_counted_and_asked_again_by_a_rerun(tmp_path, failed_lines_to):
    gen, fmt = make_inputs(tmp_path)
    out = str(tmp_path / "batch")
    state = {"broken": True}
    with FakeOpenAI(broken_judge(state)) as srv:
        srv.failed_lines_to = failed_lines_to
        c = cfg(srv, "openai-batch", max_failed_fraction=0.2, **SINGLES)
        with pytest.raises(JudgeFailed, match="2 of 6 judge calls failed"):
            judging.run_judge(gen, fmt, out, c)
        # one batch of the six calls; a failed line is not sent again in this run (nor online)
        assert len(srv.batches) == 1 and srv.count == 6
        assert not storage.exists(storage.join(out, "_SUCCESS"))
        rows = {r["id"]: r for r in storage.read_jsonl(storage.join(out, "judgments.jsonl"))}
        assert rows["single:finetuned:t0:c0"]["status"] == "error"
        assert "(500)" in rows["single:finetuned:t0:c0"]["error"] and "boom" in rows["single:finetuned:t0:c0"]["error"]
        assert (
            rows["single:finetuned:t1:c1"]["status"] == "error" and "(400)" in rows["single:finetuned:t1:c1"]["error"]
        )
        assert [r["status"] for r in rows.values()].count("ok") == 4
        rep = storage.read_json(storage.join(out, "report.json"))
        assert rep["failures"]["failed_calls"] == 2 and rep["failures"]["errors"] == 2

        # The server recovers: a rerun sends only the two failed calls, in a new batch.
        state["broken"] = False
        judging.run_judge(gen, fmt, out, c)
        assert len(srv.batches) == 2 and srv.batches["batch_2"]["request_counts"]["total"] == 2
        assert srv.count == 8
        assert storage.exists(storage.join(out, "_SUCCESS"))


def test_a_failed_batch_counts_every_request_failed_and_a_rerun_submits_again(tmp_path):
    gen, fmt = make_inputs(tmp_path)
    out = tmp_path / "batch"
    with FakeOpenAI(smart_judge) as srv:
        srv.batch_script = [{"status": "failed", "errors": {"object": "list", "data": [{"code": "invalid_model"}]}}]
        c = cfg(srv, "openai-batch", max_failed_fraction=0.2, **SINGLES)
        with pytest.raises(JudgeFailed, match="6 of 6 judge calls failed"):
            judging.run_judge(gen, fmt, str(out), c)
        assert len(srv.batches) == 1 and srv.count == 0
        rows = list(storage.read_jsonl(str(out / "judgments.jsonl")))
        assert [r["status"] for r in rows] == ["error"] * 6
        assert all("batch_1 failed" in r["error"] and "invalid_model" in r["error"] for r in rows)
        # the failed batch is forgotten: the rerun submits a new one instead of polling it again
        assert not (out / "cache" / "batch_state.json").exists()
        judging.run_judge(gen, fmt, str(out), c)
        assert len(srv.batches) == 2 and srv.batches["batch_2"]["request_counts"]["total"] == 6
        assert [r["status"] for r in storage.read_jsonl(str(out / "judgments.jsonl"))] == ["ok"] * 6


def test_an_expired_batch_asks_its_unanswered_requests_again_in_a_new_batch(tmp_path):
    gen, fmt = make_inputs(tmp_path)
    out = str(tmp_path / "batch")
    with FakeOpenAI(smart_judge) as srv:
        srv.batch_script = [{"status": "expired", "answered": 2}]
        judging.run_judge(gen, fmt, out, cfg(srv, "openai-batch", **SINGLES))
        assert [b["status"] for b in srv.batches.values()] == ["expired", "completed"]
        assert srv.batches["batch_2"]["request_counts"]["total"] == 4 and srv.count == 6
        rep = storage.read_json(storage.join(out, "report.json"))
        assert rep["failures"]["failed_calls"] == 0 and rep["usage"]["new_calls"] == 6


def test_a_batch_that_always_expires_ends_in_failed_calls_not_a_loop(tmp_path):
    gen, fmt = make_inputs(tmp_path)
    out = str(tmp_path / "batch")
    with FakeOpenAI(smart_judge) as srv:
        srv.batch_script = [{"status": "expired", "answered": 0}] * 10
        c = cfg(srv, "openai-batch", parse_retries=1, max_failed_fraction=1.0, **SINGLES)
        judging.run_judge(gen, fmt, out, c)
        # 1 + parse_retries + 1 rounds, each asking all six again; then each call is a failure
        assert len(srv.batches) == 3 and srv.count == 0
        rows = list(storage.read_jsonl(storage.join(out, "judgments.jsonl")))
        assert [r["status"] for r in rows] == ["error"] * 6
        assert all("no answer from the batch" in r["error"] for r in rows)


def run_batch_file(inp: str, out: str, handler) -> int:
    """A batch runner of one's own (as vLLM's run_batch): each input line through ``handler``, one
    output line per answer in the Batch API's format. Returns the lines run."""
    lines = [x for x in storage.read_text(inp).splitlines() if x.strip()]
    entries = []
    for n, line in enumerate(lines, 1):
        req = __import__("json").loads(line)
        reply = handler(req["body"], n)
        entries.append(
            {
                "id": f"vllm-{n}",
                "custom_id": req["custom_id"],
                "response": {"status_code": reply.status, "request_id": f"r{n}", "body": reply.body},
                "error": None,
            }
        )
    storage.write_jsonl(out, entries)
    return len(lines)


def test_batch_files_for_a_runner_of_ones_own_give_the_online_judgments(tmp_path):
    """judge.batch_runner=files: the stage writes the batch input file and stops, saying what to run;
    once the runner's output file is beside it, a rerun reads it (a re-ask goes in a second file) and
    the judgments are the online path's, byte for byte."""
    from cmv_core.judge.config import JudgeBatchPending

    gen, fmt = make_inputs(tmp_path)
    with FakeOpenAI(flaky_judge) as srv:
        judging.run_judge(gen, fmt, str(tmp_path / "sync"), cfg(srv, "openai"))
        srv.reset()
        out = str(tmp_path / "files")
        rounds = []
        for _ in range(4):
            try:
                judging.run_judge(gen, fmt, out, cfg(srv, "openai-batch", batch_runner="files"))
                break
            except JudgeBatchPending as exc:
                inp = str(exc).split(" written to ")[1].split(";")[0]
                assert "vllm.entrypoints.openai.run_batch" in str(exc) and not storage.exists(
                    storage.join(out, "_SUCCESS")
                )
                rounds.append(run_batch_file(inp, inp.replace(".input.jsonl", ".output.jsonl"), flaky_judge))
        assert srv.count == 0  # nothing went to the server: the runner answered every request
    # round 1: every call; round 2: the one re-ask after the unparseable answer
    assert len(rounds) == 2 and rounds[1] == 1
    sync = storage.read_bytes(storage.join(str(tmp_path / "sync"), "judgments.jsonl"))
    assert storage.read_bytes(storage.join(out, "judgments.jsonl")) == sync
