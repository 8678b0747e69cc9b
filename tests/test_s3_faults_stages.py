"""S3 faults in the stages that hold state across a long run (README, "Inputs and outputs"): train's
checkpoints and the judge's cache on S3 resume after an outage beyond the budget without repeating
finished work, counted at the proxy and at the judge's server; and a stage stopped by SIGHUP releases its
lease as on SIGTERM. The store, the proxy and the budget (8 s) are those of tests/test_s3_faults.py; an
outage meant to outlast the budget is open-ended and ended by the test once the stage has failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import test_s3_faults as faults
from conftest import REPO
from s3_fault_proxy import FaultProxy
from test_s3_faults import BUDGET_S, CREDS, PART_BYTES, TINY, cmv, ok, report

from cmv_core import storage

moto_url, store = faults.moto_url, faults.store  # the store and the proxy of tests/test_s3_faults.py
LONG_S = 600  # an outage that outlasts every retry, until end_outage()


def popen_cmv(proxy: FaultProxy, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        **CREDS,
        "AWS_ENDPOINT_URL": proxy.url,
        "CMV_S3_RETRY_BUDGET_S": str(BUDGET_S),
        "CMV_S3_PART_BYTES": str(PART_BYTES),
    }
    cmd = [sys.executable, str(REPO / "tests" / "s3_small_parts.py"), *args]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)


def cmv_store_back_after_error(proxy: FaultProxy, *args: str) -> tuple[int, str, float]:
    """Run a stage; when it prints its error line (it gave up), the store comes back, so its way out
    (aborting uploads, releasing the lease) is seen to run. (exit code, stderr, when it gave up)."""
    proc = popen_cmv(proxy, *args)
    lines, gave_up = [], 0.0
    for line in proc.stderr:
        lines.append(line)
        if ": error:" in line and not gave_up:
            gave_up = time.monotonic()
            proxy.end_outage()
    return proc.wait(timeout=120), "".join(lines), gave_up


def assert_failed_clean(out: str, bucket: str, rc: int, stderr: str) -> None:
    assert rc == 1, stderr[-4000:]
    errors = [ln for ln in stderr.splitlines() if ": error:" in ln]
    assert "Traceback" not in stderr and len(errors) == 1, stderr[-4000:]
    assert "rerun: cmv" in errors[0]
    assert not storage.exists(storage.join(out, storage.SUCCESS))
    assert not storage.exists(storage.join(out, storage.LEASE)), "the failed attempt left its lease"
    assert storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# ------------------------------------------------------------------ train: checkpoints on S3


def train_args(bucket: str) -> list[str]:
    # 4 steps, a checkpoint every 2 (configs/tiny.yaml), each mirrored to S3 in 8 KiB parts
    return ["train", "--input", f"s3://{bucket}/r/format", "--output", f"s3://{bucket}/r/train", "--config", TINY]


def prepare_format(bucket: str, format_output: str) -> None:
    """train's input in the store: conftest's format output of the bundled sample (the store's S3 faults are
    tested on clean and format in tests/test_s3_faults.py; here they hit train alone)."""
    storage.upload_dir(format_output, f"s3://{bucket}/r/format")


def checkpoint_puts(proxy: FaultProxy, step: int, since: int = 0) -> int:
    return sum(1 for m, p in proxy.counters.requests[since:] if m == "PUT" and f"/checkpoint-{step}/" in p)


@pytest.mark.slow
def test_train_rides_out_an_outage_during_a_checkpoint_upload(store, format_output, tiny_model_dir):
    proxy, bucket = store
    prepare_format(bucket, format_output)
    proxy.outage_at(BUDGET_S / 2, "PUT", "/checkpoint-2/")
    proc = ok(cmv(proxy, *train_args(bucket)))
    report("outage 4 s at checkpoint-2 upload (budget 8 s)", "train", "completes", proxy, time.monotonic())
    assert proxy.counters.faults["outage"] == 1
    assert proxy.counters.faults.get("reset", 0) + proxy.counters.faults.get("refused", 0) >= 1
    metrics = storage.read_json(f"s3://{bucket}/r/train/metrics.json")
    assert metrics["global_step"] == 4 and metrics["resumed_from_step"] is None, proc.stderr[-2000:]
    assert checkpoint_puts(proxy, 4) >= 1  # training went on after the checkpoint the outage hit


@pytest.mark.slow
def test_train_beyond_the_budget_fails_clean_and_resumes_from_the_last_mirrored_checkpoint(
    store, format_output, tiny_model_dir
):
    proxy, bucket = store
    out = f"s3://{bucket}/r/train"
    prepare_format(bucket, format_output)
    proxy.outage_at(LONG_S, "PUT", "/checkpoint-4/")  # checkpoint-2 is mirrored and complete by then
    rc, stderr, gave_up = cmv_store_back_after_error(proxy, *train_args(bucket))
    report("outage beyond the budget at checkpoint-4 upload", "train", "exit 1, clean", proxy, gave_up)
    assert "S3 failed" in stderr
    assert_failed_clean(out, bucket, rc, stderr)
    before = len(proxy.counters.requests)
    rerun = ok(cmv(proxy, *train_args(bucket)))
    assert "resuming from checkpoint-2" in rerun.stderr
    metrics = storage.read_json(f"{out}/metrics.json")
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    # steps 1-2 were not trained again: the rerun saved no checkpoint-2, only checkpoint-4
    assert checkpoint_puts(proxy, 2, since=before) == 0
    assert checkpoint_puts(proxy, 4, since=before) >= 1


# ------------------------------------------------------------------ judge: its cache on S3


@pytest.mark.slow
def test_judge_beyond_the_budget_keeps_its_answers_and_the_rerun_asks_only_the_rest(store, monkeypatch, tmp_path):
    """The cache flushes every 4 answers; the store goes away at the 6th call and stays away past the
    flush of answers 5-8. The stage fails; the rerun asks only the calls no run answered."""
    from fake_openai_server import FakeOpenAI
    from test_judge import config, make_inputs, smart_judge

    from cmv_core.judge import stage as judging

    proxy, bucket = store
    gen, fmt = make_inputs(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("CMV_S3_RETRY_BUDGET_S", str(BUDGET_S))
    monkeypatch.setenv("CMV_SCRATCH", str(tmp_path / "scratch"))
    out = f"s3://{bucket}/r/judge"

    def judge_then_outage(body, n):
        if n == 6:
            proxy.outage(LONG_S)
        return smart_judge(body, n)

    with FakeOpenAI(judge_then_outage) as srv:
        cfg = config(srv, calibration=False, cache_flush_every=4, concurrency=1)
        with pytest.raises(Exception, match="(?i)connect|S3 failed"):
            judging.run_judge(gen, fmt, out, cfg)
        gave_up = time.monotonic()
        proxy.end_outage()
        storage.release_all()  # as the CLI does on the way out
        report("outage beyond the budget at call 6 of 21", "judge", "fails, rerun asks the rest", proxy, gave_up)
        first = srv.count
        assert first == 8  # the stage stopped at the flush that failed (concurrency 1)
        assert not storage.exists(f"{out}/{storage.SUCCESS}") and not storage.exists(f"{out}/{storage.LEASE}")
        judging.run_judge(gen, fmt, out, cfg)
        total = 9 + 12  # singles (3 prompts x base, finetuned, human) + 2 comparisons x 3 x both orders
        assert srv.count - first == total - first  # answers 1-8 were not asked again
    usage = storage.read_json(f"{out}/report.json")["usage"]
    assert usage["cached_calls"] == first and usage["new_calls"] == total - first
    assert not any((tmp_path / "scratch").glob("cmv-judge-cache-*/*.jsonl"))  # uploaded, then dropped


# ------------------------------------------------------------------ SIGHUP


def test_sighup_stops_the_stage_in_one_line_and_releases_its_lease(store, tmp_path):
    """A closed terminal (SIGHUP) stops a stage as SIGTERM does: exit 129, one line, the S3 lease released,
    so the rerun starts at once. The stage is caught holding its lease, blocked opening its input (a fifo)."""
    proxy, bucket = store
    fifo = tmp_path / "dump.jsonlist"
    os.mkfifo(fifo)
    out = f"s3://{bucket}/r/clean"
    proc = popen_cmv(proxy, "clean", "--input", str(fifo), "--output", out, "--config", TINY)
    deadline = time.monotonic() + 120
    while not storage.exists(f"{out}/{storage.LEASE}"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGHUP)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 129, stderr[-4000:]
    errors = [ln for ln in stderr.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "stopped by SIGHUP" in errors[0] and "Traceback" not in stderr, stderr[-4000:]
    assert not storage.exists(f"{out}/{storage.LEASE}") and not storage.exists(f"{out}/{storage.SUCCESS}")
