"""S3 faults between each stage and its store (README, "Inputs and outputs"): outages, resets, throttling,
cut and stalled bodies, a store restarted without its state, injected by tests/s3_fault_proxy.py between
the ``cmv`` process and a loopback S3 server (moto, in its own process, which keeps its state).

The issue's 60 s budget and 90 s outage are scaled down: CMV_S3_RETRY_BUDGET_S=8, a 4 s outage (ridden
out) and a 20 s one (fails clean). Parts are 8 KiB (tests/s3_small_parts.py) so the tiny recipe's files
go up as multipart uploads. Each test prints one ``FAULT`` line (fault, stage, outcome, ride-out time)
for the report; assertions count events, never time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO
from s3_fault_proxy import FaultProxy

from cmv_core import storage

TINY = str(CONFIGS / "tiny.yaml")
BUDGET_S = 8
PART_BYTES = 8 * 1024
COMPARED = {
    "clean": ("conversations.jsonl.gz", "rejects.jsonl.gz"),
    "format": ("train.jsonl", "val.jsonl", "test.jsonl", "pairs.jsonl"),
}
CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url():
    """A loopback S3 server in its own process, accepting parts as small as the tests' ones."""
    port = _free_port()
    env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "1024"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "moto_s3_server.py"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture()
def store(moto_url, monkeypatch):
    """This process reads the store directly; the stages go through the proxy. Returns (proxy, bucket)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    host, port = moto_url.rsplit("/", 1)[1].split(":")
    proxy = FaultProxy(host, int(port), seed=1).start()
    try:
        yield proxy, bucket
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def reference(clean_output, format_output) -> Path:
    """clean and format run locally without faults (conftest's session run: `cmv clean` then `cmv format` of
    the bundled sample with this recipe): what every faulted S3 run must equal byte for byte."""
    assert Path(format_output).parent == Path(clean_output).parent
    return Path(clean_output).parent


def cmv(proxy: FaultProxy, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A stage as a user runs it, its S3 calls through the proxy."""
    full = {
        **os.environ,
        **CREDS,
        "AWS_ENDPOINT_URL": proxy.url,
        "CMV_S3_RETRY_BUDGET_S": str(BUDGET_S),
        "CMV_S3_PART_BYTES": str(PART_BYTES),
        **env,
    }
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "s3_small_parts.py"), *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
        cwd=REPO,
    )


def stage_args(stage: str, bucket: str, sample_dump: str) -> list[str]:
    src = sample_dump if stage == "clean" else f"s3://{bucket}/r/clean"
    return [stage, "--input", src, "--output", f"s3://{bucket}/r/{stage}", "--config", TINY]


def prepare(stage: str, proxy: FaultProxy, bucket: str, sample_dump: str) -> None:
    """The stage's input on S3, written without faults."""
    if stage == "format":
        ok(cmv(proxy, *stage_args("clean", bucket, sample_dump)))


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def assert_same_as_reference(stage: str, bucket: str, reference: Path) -> None:
    out = f"s3://{bucket}/r/{stage}"
    assert storage.require_success(out)["stage"] == stage
    for name in COMPARED[stage]:
        with storage.open_read_raw(storage.join(out, name)) as f:
            assert f.read() == (reference / stage / name).read_bytes(), name


def assert_failed_clean(stage: str, bucket: str, proc: subprocess.CompletedProcess) -> None:
    out = f"s3://{bucket}/r/{stage}"
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-4000:]
    assert f"rerun: cmv {stage}" in errors[0]
    assert not storage.exists(storage.join(out, storage.SUCCESS))
    assert not storage.exists(storage.join(out, storage.LEASE)), "the failed attempt left its lease"
    assert storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def part_uploads(proxy: FaultProxy) -> int:
    return sum(1 for m, p in proxy.counters.requests if m == "PUT" and "partNumber=" in p)


def report(fault: str, stage: str, outcome: str, proxy: FaultProxy, end: float) -> None:
    cost = f"{end - proxy.outage_started:.1f} s" if proxy.outage_started else "-"
    print(f"\nFAULT | {fault} | {stage} | {outcome} | {cost} | {proxy.counters.faults}", flush=True)


# ------------------------------------------------------------------ outages


@pytest.mark.parametrize("stage", ["clean", "format"])
def test_outage_mid_multipart_upload_is_ridden_out(stage, store, sample_dump, reference):
    proxy, bucket = store
    prepare(stage, proxy, bucket, sample_dump)
    proxy.outage_at(BUDGET_S / 2, "PUT", "partNumber=1")  # the stage's first multipart upload
    ok(cmv(proxy, *stage_args(stage, bucket, sample_dump)))
    report("outage 4 s at part 1 (budget 8 s)", stage, "completes, byte-identical", proxy, time.monotonic())
    assert proxy.counters.faults["outage"] == 1
    assert proxy.counters.faults.get("reset", 0) + proxy.counters.faults.get("refused", 0) >= 1
    assert part_uploads(proxy) >= 2
    assert_same_as_reference(stage, bucket, reference)
    assert not storage.exists(f"s3://{bucket}/r/{stage}/{storage.LEASE}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["clean", "format"])
def test_outage_beyond_the_budget_fails_clean_and_the_rerun_completes(stage, store, sample_dump, reference):
    proxy, bucket = store
    prepare(stage, proxy, bucket, sample_dump)
    proxy.outage_at(20, "PUT", "partNumber=1")
    proc = cmv(proxy, *stage_args(stage, bucket, sample_dump))
    report("outage 20 s at part 1 (budget 8 s)", stage, "exit 1, clean", proxy, time.monotonic())
    assert "S3 failed after retries" in proc.stderr
    assert_failed_clean(stage, bucket, proc)
    rerun = ok(cmv(proxy, *stage_args(stage, bucket, sample_dump)))  # at once: no lease to wait for
    assert "being written by" not in rerun.stderr and "waiting until" not in rerun.stderr
    assert_same_as_reference(stage, bucket, reference)


def _reset_store_when_down(proxy: FaultProxy, moto_url: str, bucket: str) -> threading.Thread:
    """When the outage starts, the store loses its state (moto's reset) and comes back with the bucket."""

    def run():
        while proxy.outage_started is None:
            time.sleep(0.01)
        urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).read()
        storage.s3_client().create_bucket(Bucket=bucket)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_store_restarted_without_its_state_mid_upload(store, moto_url, sample_dump, reference):
    proxy, bucket = store
    stage = "clean"
    proxy.outage_at(2, "PUT", "partNumber=1")
    resetter = _reset_store_when_down(proxy, moto_url, bucket)
    proc = cmv(proxy, *stage_args(stage, bucket, sample_dump))
    resetter.join(30)
    outcome = "completes" if proc.returncode == 0 else "exit 1, clean: " + proc.stderr.strip().splitlines()[-1][:300]
    report("store restarted, state lost, at part 1", stage, outcome, proxy, time.monotonic())
    assert "uploading the file again" in proc.stderr  # NoSuchUpload restarted the file, not failed it
    if proc.returncode == 0:
        assert_same_as_reference(stage, bucket, reference)
    else:
        assert_failed_clean(stage, bucket, proc)
        ok(cmv(proxy, *stage_args(stage, bucket, sample_dump)))
        assert_same_as_reference(stage, bucket, reference)


# ------------------------------------------------------------------ throttling and bodies


@pytest.mark.parametrize("stage", ["clean", "format"])
def test_twenty_percent_slowdown_completes_with_the_same_output(stage, store, sample_dump, reference):
    proxy, bucket = store
    prepare(stage, proxy, bucket, sample_dump)
    proxy.slowdown(0.2)
    ok(cmv(proxy, *stage_args(stage, bucket, sample_dump)))
    report("503 SlowDown on 20% of requests", stage, "completes, byte-identical", proxy, time.monotonic())
    assert proxy.counters.faults["slowdown"] >= 1
    assert_same_as_reference(stage, bucket, reference)


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_a_download_cut_or_stalled_midway_is_read_on(fault, store, sample_dump, reference):
    proxy, bucket = store
    prepare("format", proxy, bucket, sample_dump)
    if fault == "cut":
        proxy.cut_next_body("GET", "conversations.jsonl.gz")
        env = {}
    else:
        proxy.stall_next_body(5, "GET", "conversations.jsonl.gz")
        env = {"CMV_S3_READ_TIMEOUT_S": "1"}
    proc = ok(cmv(proxy, *stage_args("format", bucket, sample_dump), **env))
    report(f"body {fault} midway on download", "format", "completes, byte-identical", proxy, time.monotonic())
    assert proxy.counters.faults[fault] == 1
    gets = [p for m, p in proxy.counters.requests if m == "GET" and "conversations.jsonl.gz" in p]
    assert len(gets) >= 2  # the cut read, then the rest of it
    assert "reading on from there" in proc.stderr
    assert_same_as_reference("format", bucket, reference)


# ------------------------------------------------------------------ long-running stages resume


@pytest.mark.slow
def test_generate_resumes_after_an_outage_beyond_the_budget(store, monkeypatch, tmp_path, tiny_model_dir):
    """Shards written before an outage that outlasts the budget are kept; the rerun makes only the others."""
    from test_generation import config, write_format_output

    from cmv_core.generate import stage as gen

    proxy, bucket = store
    cfg = config(tiny_model_dir)
    fmt = write_format_output(str(tmp_path / "format"))
    whole = gen.run_generate(fmt, str(tmp_path / "whole"), cfg)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("CMV_S3_RETRY_BUDGET_S", str(BUDGET_S))
    out = f"s3://{bucket}/r/generate"
    made: list[tuple[str, int]] = []

    def outage_after_first(variant: str, k: int) -> None:
        made.append((variant, k))
        if len(made) == 1:
            proxy.outage(20)

    with pytest.raises(Exception, match="(?i)connect|S3 failed"):
        gen.run_generate(fmt, out, cfg, after_shard=outage_after_first)
    storage.release_all()  # as the CLI does on the way out
    report("outage 20 s after shard 1 (budget 8 s)", "generate", "fails, rerun resumes", proxy, time.monotonic())
    while proxy.is_down():
        time.sleep(0.2)
    assert not storage.exists(f"{out}/{storage.SUCCESS}") and not storage.exists(f"{out}/{storage.LEASE}")
    made.clear()
    manifest = gen.run_generate(fmt, out, cfg, after_shard=lambda v, k: made.append((v, k)))
    assert made == [("base", 1), ("base", 2)]  # shard 0 was not made again
    assert manifest["summary"]["shards_resumed"] == 1
    assert storage.read_bytes(f"{out}/generations.jsonl") == storage.read_bytes(
        str(tmp_path / "whole" / "generations.jsonl")
    )
    assert whole["summary"]["shards_resumed"] == 0


# ------------------------------------------------------------------ botocore internals


@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_botocore_retry_internals_s3_py_rebuilds_are_still_there(mode, monkeypatch):
    """cmv_core/storage/s3.py (``_install_retries``) swaps botocore's standard retry handler, found by its
    unique id ``retry-config-s3``, for one with a retry quota sized from ``RetryQuotaChecker._RETRY_COST``.
    Both are botocore internals: an upgrade that renames them would leave the default quota in place (a
    stage giving up a second into an outage) or break every S3 client, so it must fail here, by name."""
    import botocore
    from botocore.retries import standard

    from cmv_core.storage import s3

    version = botocore.__version__
    cost = getattr(standard.RetryQuotaChecker, "_RETRY_COST", None)
    assert isinstance(cost, int) and cost > 0, (
        f"botocore {version}: RetryQuotaChecker._RETRY_COST is gone ({cost!r}); s3.py sizes the retry quota "
        "from it: update _install_retries for this botocore, or pin the tested one"
    )
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CMV_S3_RETRY_MODE", mode)
    monkeypatch.setenv("CMV_S3_RETRY_BUDGET_S", "60")
    raw = boto3_client_with_retries(mode)
    emitter = raw.meta.events._emitter
    assert "retry-config-s3" in emitter._unique_id_handlers, (
        f"botocore {version} no longer registers its retry handler as 'retry-config-s3': s3.py cannot "
        "unregister it, and the default retry quota would stay: update _install_retries"
    )
    client = s3._s3_client()
    handlers = [
        h
        for h in client.meta.events._emitter._handlers.prefix_search("needs-retry.s3.PutObject")
        if isinstance(getattr(h, "__self__", None), standard.RetryHandler)
    ]
    assert len(handlers) == 1, f"botocore {version}: {len(handlers)} retry handlers on the S3 client, not s3.py's one"
    attempts, _ = s3.retry_settings(60)
    capacity = handlers[0].__self__._retry_quota._quota._max_capacity
    assert capacity == cost * attempts * client.meta.config.max_pool_connections, (
        f"botocore {version}: the S3 client's retry quota is {capacity}, not the one s3.py sized"
    )


def boto3_client_with_retries(mode: str):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(retries={"total_max_attempts": 5, "mode": mode}))


def test_botocore_in_the_images_is_the_one_tested():
    """The image builds pin boto3/botocore exactly (images/constraints.txt): the retry internals checked
    above are those of the version the images run."""
    import boto3
    import botocore

    pins = dict(
        line.split("==", 1) for line in (REPO / "images" / "constraints.txt").read_text().splitlines() if "==" in line
    )
    for name, version in (("boto3", boto3.__version__), ("botocore", botocore.__version__)):
        assert pins.get(name) == version, (
            f"{name} {version} is tested here but images/constraints.txt pins {pins.get(name)}: re-pin "
            "(make images-constraints) after checking s3.py's retry internals on the new version"
        )
