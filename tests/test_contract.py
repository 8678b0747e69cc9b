"""The artifact contract under faults (issue 12): verified hand-offs, complete and exclusive outputs,
settings checked before any work, one error path. Each test is the reproduction the issue names."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO, run_cmv

from cmv_core import errors, storage
from cmv_core.clean.stage import CleanConfig, run_clean
from cmv_core.storage import lease
from cmv_core.storage.uris import split_s3

TINY = str(CONFIGS / "tiny.yaml")
CLEAN_FILES = ("conversations.jsonl.gz", "rejects.jsonl.gz", "stats.json")


def _clean(dump: str, out: str) -> dict:
    return run_clean([dump], out, CleanConfig(workers=1))


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# --- verified hand-off ---------------------------------------------------------------------------


def _same_size_gzip(data: bytes, size: int) -> bytes:
    """A valid gzip of ``data`` exactly ``size`` bytes long (padded with a header comment), so that only
    the content digest can tell it from the original."""
    packed = gzip.compress(data, compresslevel=9, mtime=0)
    pad = size - len(packed) - 1
    assert pad >= 0
    flags = bytes([packed[3] | 0x10])  # FCOMMENT
    return packed[:3] + flags + packed[4:10] + b"x" * pad + b"\0" + packed[10:]


def test_changed_content_byte_in_valid_gzip_is_refused(tmp_path, sample_dump, tiny_model_dir):
    clean = str(tmp_path / "r" / "clean")
    _clean(sample_dump, clean)
    conv = Path(clean) / "conversations.jsonl.gz"
    text = gzip.decompress(conv.read_bytes())
    i = text.index(b'"title":"') + len(b'"title":"')
    changed = text[:i] + bytes([text[i] ^ 0x01]) + text[i + 1 :]  # still valid JSON, valid gzip
    conv.write_bytes(_same_size_gzip(changed, conv.stat().st_size))
    listed = storage.require_success(clean)["files"]
    expected = next(f["sha256"] for f in listed if f["path"] == conv.name)
    out = tmp_path / "r" / "format"
    proc = run_cmv("format", "--input", clean, "--output", str(out), "--config", TINY, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert str(conv) in line and expected in line and storage.sha256(str(conv)) in line
    assert not (out / storage.SUCCESS).exists()


def test_verification_while_streaming_catches_a_same_size_edit(tmp_path, sample_dump):
    clean = str(tmp_path / "r" / "clean")
    _clean(sample_dump, clean)
    stats = Path(clean) / "stats.json"
    data = bytearray(stats.read_bytes())
    data[data.index(b'"read"') + 1] = ord("R")  # same size, so only the hash can tell
    stats.write_bytes(bytes(data))
    run = storage.begin_stage("format", str(tmp_path / "r" / "format"), inputs=[clean], config={})
    with pytest.raises(errors.IntegrityError, match=r"stats.json: content does not match .*_SUCCESS"):
        storage.read_json(str(stats))
    # the untouched file reads fine, fully or partly (the rest is hashed at the end of the block)
    with storage.open_read(storage.join(clean, "conversations.jsonl.gz")) as f:
        f.readline()
    # a reader that chokes on the changed bytes is told the file changed, not just its own parse error
    with pytest.raises(errors.IntegrityError, match="content does not match"):
        with storage.open_read(str(stats)) as f:
            json.loads(f.read().replace(b'"Read"', b'"Read'))
    storage.abort_stage(run)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "is empty"), (b"{garbage", "is not valid JSON"), (b'{"stage": "clean"}', "is not a stage manifest")],
)
def test_empty_or_garbage_success_is_refused_in_one_line(tmp_path, sample_dump, content, reason):
    clean = tmp_path / "r" / "clean"
    _clean(sample_dump, str(clean))
    (clean / storage.SUCCESS).write_bytes(content)
    with pytest.raises(storage.ManifestError, match=reason):
        storage.begin_stage("format", str(tmp_path / "r" / "format"), inputs=[str(clean)], config={})
    proc = run_cmv(
        "format", "--input", str(clean), "--output", str(tmp_path / "r" / "format"), "--config", TINY, check=False
    )
    assert proc.returncode == 2
    assert reason in _one_error_line(proc.stderr)


def test_wrong_stage_success_is_refused(tmp_path, sample_dump):
    clean = str(tmp_path / "r" / "clean")
    _clean(sample_dump, clean)
    with pytest.raises(storage.ManifestError, match="manifest of stage 'clean', expected 'format'"):
        storage.begin_stage("train", str(tmp_path / "r" / "train"), inputs=[clean], config={})


def test_own_garbage_success_means_rerun(tmp_path, sample_dump):
    clean = tmp_path / "r" / "clean"
    _clean(sample_dump, str(clean))
    (clean / storage.SUCCESS).write_bytes(b"not json")
    assert _clean(sample_dump, str(clean)) is not None  # rerun, not a traceback and not a skip
    assert storage.require_success(str(clean))["stage"] == "clean"


def test_listed_file_missing_or_unlisted_file_present_is_refused(tmp_path, sample_dump, s3_bucket):
    for root in (str(tmp_path / "local"), s3_bucket + "/r"):
        clean = storage.join(root, "clean")
        _clean(sample_dump, clean)
        storage.write_text(storage.join(clean, "extra.txt"), "not listed")
        with pytest.raises(errors.IntegrityError, match="there but not listed: extra.txt"):
            storage.begin_stage("format", storage.join(root, "format"), inputs=[clean], config={})
        storage.delete(storage.join(clean, "extra.txt"))
        storage.delete(storage.join(clean, "rejects.jsonl.gz"))
        with pytest.raises(errors.IntegrityError, match="listed but not there: rejects.jsonl.gz"):
            storage.begin_stage("format", storage.join(root, "format"), inputs=[clean], config={})


# --- complete and exclusive outputs ----------------------------------------------------------------


def test_finish_refuses_missing_foreign_or_replaced_files(tmp_path, s3_bucket):
    for root in (str(tmp_path), s3_bucket):
        out = storage.join(root, "r", "clean")
        run = storage.begin_stage("clean", out, inputs=[], config={})
        for name in CLEAN_FILES[:2]:
            storage.write_text(storage.join(out, name), name)
        with pytest.raises(errors.OutputError, match="missing stats.json"):
            storage.finish_stage(run, {}, declared=True)
        assert not storage.exists(storage.join(out, storage.SUCCESS))

        run = storage.begin_stage("clean", out, inputs=[], config={})
        for name in CLEAN_FILES:
            storage.write_text(storage.join(out, name), name)
        # another writer replaces one file, through its own client (no attempt of ours)
        if storage.is_s3(out):
            bucket, key = split_s3(storage.join(out, "stats.json"))
            storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"stats.json")
        else:
            other = Path(storage.local_path(out)) / ".other"
            other.write_text("stats.json")
            os.replace(other, Path(storage.local_path(out)) / "stats.json")
        storage.write_text(storage.join(out, "stray.txt"), "x")
        with pytest.raises(errors.OutputError) as info:
            storage.finish_stage(run, {}, declared=True)
        assert "stats.json replaced" in str(info.value) and "not declared by stage clean: stray.txt" in str(info.value)
        assert not storage.exists(storage.join(out, storage.SUCCESS))


HOLD = """
import sys, time
from cmv_core import storage
run = storage.begin_stage("clean", sys.argv[1], inputs=[], config={})
print("holding", run.attempt, flush=True)
time.sleep(120)
"""


def _holder(out: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, out],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    line = proc.stdout.readline()
    assert line.startswith("holding"), line
    return proc, line.split()[1]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_writer_is_refused_while_the_first_lives(tmp_path, where, request, sample_dump):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    out = storage.join(root, "r", "clean")
    proc, attempt = _holder(out)
    try:
        with pytest.raises(errors.LeaseHeld, match=f"attempt {attempt} .*pid {proc.pid}"):
            storage.begin_stage("clean", out, inputs=[], config={})
        cli = run_cmv("clean", "--input", sample_dump, "--output", out, "--config", TINY, check=False)
        assert cli.returncode == 1 and attempt in _one_error_line(cli.stderr)
        assert not storage.exists(storage.join(out, storage.SUCCESS))
    finally:
        proc.kill()
        proc.wait()
    # the holder was SIGKILLed on this host: its lease is taken over at once
    run = storage.begin_stage("clean", out, inputs=[], config={})
    assert run is not None and run.attempt != attempt
    storage.abort_stage(run)


def test_a_lease_of_another_host_is_taken_only_when_it_expires_unrenewed(s3_bucket, tmp_path, caplog):
    import logging
    import threading

    for root in (s3_bucket, str(tmp_path)):
        out = storage.join(root, "r", "clean")
        uri = storage.join(out, lease.LEASE)
        holder = {"attempt": "elsewhere", "host": "other-node", "pid": 1, "since": "t", "until": time.time() + 3}
        storage.write_json(uri, holder)

        def renew(uri=uri, holder=holder):  # a live holder on another node renews its lease
            time.sleep(1)
            storage.write_json(uri, {**holder, "until": time.time() + 60})

        threading.Thread(target=renew).start()
        with pytest.raises(errors.LeaseHeld, match="attempt elsewhere \\(host other-node"):
            storage.begin_stage("clean", out, inputs=[], config={})
        # a dead holder (a killed pod): not renewed, taken over once it expires
        until = time.time() + 2
        storage.write_json(uri, {**holder, "until": until})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cmv_core.storage"):
            run = storage.begin_stage("clean", out, inputs=[], config={})
        # Counted events, not a duration: one wait for the holder, then one takeover, logged after
        # the lease's own expiry (a slow S3 write before the old stopwatch started could not fail this).
        said = [r for r in caplog.records if "waiting until" in r.message or "taking over" in r.message]
        assert [r.message.split()[0] for r in said] == ["waiting", "taking"], [r.message for r in said]
        assert said[1].created > until
        assert json.loads(storage.read_bytes(uri))["attempt"] == run.attempt
        storage.abort_stage(run)
        assert not storage.exists(uri)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_process(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def test_s3_server_lost_mid_stage_and_replaced_by_a_fresh_one(tmp_path, sample_dump, monkeypatch, s3_server):
    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CMV_S3_RETRY_BUDGET_S", "5")
    server = _moto_process(port)
    try:
        storage.s3_client().create_bucket(Bucket="lost")
        out = "s3://lost/r/clean"
        client = storage.s3_client()
        real = client.upload_file
        uploads = []

        def upload_then_lose_the_server(*a, **kw):
            nonlocal server
            real(*a, **kw)
            uploads.append(a[2])
            if len(uploads) == 1:  # the first file is in; the store is lost and a fresh, empty one comes back
                server.kill()
                server.wait()
                server = _moto_process(port)
                storage.s3_client().create_bucket(Bucket="lost")

        monkeypatch.setattr(client, "upload_file", upload_then_lose_the_server)
        with pytest.raises(
            errors.OutputError,
            match="missing conversations.jsonl.gz; "
            "conversations.jsonl.gz was written by this attempt but is not in the store",
        ):
            _clean(sample_dump, out)
        assert not storage.exists(storage.join(out, storage.SUCCESS))
        monkeypatch.setattr(client, "upload_file", real)
        _clean(sample_dump, out)  # the rerun completes
        reference = str(tmp_path / "ref" / "clean")
        _clean(sample_dump, reference)
        for name in CLEAN_FILES:
            assert storage.read_bytes(storage.join(out, name)) == storage.read_bytes(storage.join(reference, name))
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
def test_a_20s_s3_outage_is_ridden_out(tmp_path, sample_dump, monkeypatch, s3_server):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CMV_S3_RETRY_BUDGET_S", "30")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    storage.s3_client().create_bucket(Bucket="outage")
    client = storage.s3_client()
    real = client.upload_file
    state = {"down_at": None, "server": server}

    def restart_later():
        time.sleep(20)
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["server"].start()  # moto's state lives in this process: the objects are still there

    def upload_then_outage(*a, **kw):
        real(*a, **kw)
        if state["down_at"] is None:
            state["down_at"] = time.monotonic()
            server.stop()
            import threading

            threading.Thread(target=restart_later, daemon=True).start()

    monkeypatch.setattr(client, "upload_file", upload_then_outage)
    try:
        stats = _clean(sample_dump, "s3://outage/r/clean")
        assert time.monotonic() - state["down_at"] >= 20  # it did wait the outage out
        assert stats is not None and storage.require_success("s3://outage/r/clean")["stage"] == "clean"
    finally:
        state["server"].stop()


def test_s3_gone_for_good_fails_in_one_line_with_exit_1(tmp_path, sample_dump):
    port = _free_port()  # nothing listens there
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CMV_S3_RETRY_BUDGET_S": "0.5",
    }
    proc = run_cmv(
        "clean", "--input", sample_dump, "--output", "s3://gone/r/clean", "--config", TINY, env=env, check=False
    )
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert "S3 failed after retries" in line and "rerun: cmv clean" in line


def test_retry_budget_sets_botocore_attempts():
    assert storage.s3_max_attempts(60) > storage.s3_max_attempts(30) > storage.s3_max_attempts(1) >= 2
    # the expected backoff of that many attempts covers twice the budget
    n = storage.s3_max_attempts(30)
    assert sum(min(0.05 * 2**i, 20) / 2 for i in range(n - 1)) >= 60


# --- settings checked before any work ---------------------------------------------------------------


def test_section_typo_is_an_error_listing_the_known_ones(tmp_path, sample_dump):
    from cmv_core.config import ConfigError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text((CONFIGS / "tiny.yaml").read_text() + "\ntrian:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match="unknown section.* trian; known: model, clean, format, train"):
        load_recipe(str(recipe))
    out = tmp_path / "r" / "clean"
    proc = run_cmv(
        "clean",
        "--input",
        sample_dump,
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "trian.max_steps=5",
        check=False,
    )
    assert proc.returncode == 2 and "trian" in _one_error_line(proc.stderr)
    assert not out.exists()


def test_cmv_run_with_a_typo_in_its_last_stage_runs_no_stage(tmp_path):
    root = tmp_path / "runs"
    proc = run_cmv("run", "--config", TINY, "--root", str(root), "--run-id", "t", "--set", "judge.modle=x", check=False)
    assert proc.returncode == 2
    assert "modle" in _one_error_line(proc.stderr) and "known:" in proc.stderr
    assert not root.exists()


def test_unknown_uri_scheme_and_bad_run_ids_are_refused(tmp_path, sample_dump):
    proc = run_cmv("clean", "--input", sample_dump, "--output", "ftp://x/out", "--config", TINY, check=False)
    assert proc.returncode == 2 and "unknown URI scheme ftp://" in _one_error_line(proc.stderr)
    assert not (REPO / "ftp:").exists()
    root = tmp_path / "runs"
    for argv in (
        ["run", "--config", TINY, "--root", str(root), "--run-id", "../x"],
        ["clean", "--input", sample_dump, "--output", str(root / "x" / "clean"), "--run-id", "../x", "--config", TINY],
    ):
        proc = run_cmv(*argv, check=False)
        assert proc.returncode == 2 and "run id '../x' is not valid" in _one_error_line(proc.stderr)
    assert not root.exists() and not (tmp_path / "x").exists()


# --- one error path -----------------------------------------------------------------------------------


def test_sigterm_exits_143_in_one_line(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmv_core.cli",
            "format",
            "--input",
            str(tmp_path / "nothing"),
            "--output",
            str(tmp_path / "format"),
            "--config",
            TINY,
            "--wait-for-input",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    # Signalled as soon as the stage says it waits for its input (its SIGTERM handler is installed before
    # that line; a fixed sleep lost to a cold start's imports: killed by the default action, -15). The
    # signal may land while logging still emits that line: Terminated is a BaseException, so logging's
    # own error handler ("--- Logging error ---") cannot swallow it and leave the stage waiting.
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "waiting up to 60 s for" in line:
            break
    assert seen and "waiting up to 60 s for" in seen[-1], "".join(seen)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "SIGTERM" in _one_error_line(err)


def test_a_stop_signal_that_lands_inside_logging_is_not_swallowed():
    # logging's Handler.emit catches Exception and prints "--- Logging error ---": the handler's
    # Terminated must pass through it, as KeyboardInterrupt does, or the stage carries on after SIGTERM.
    import logging

    from cmv_core.errors import Terminated

    class SignalledStream:
        def write(self, text):
            raise Terminated("stopped by SIGTERM")

        def flush(self):
            pass

    logger = logging.getLogger("cmv-test-signal-in-emit")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(SignalledStream()))
    try:
        with pytest.raises(Terminated):
            logger.warning("waiting up to 60 s for the input")
    finally:
        logger.handlers.clear()


# --- the smaller ones ----------------------------------------------------------------------------------


def test_raw_fingerprint_is_the_content(tmp_path, sample_dump):
    dump = tmp_path / "dump.jsonlist"
    dump.write_bytes(Path(sample_dump).read_bytes())
    out = str(tmp_path / "r" / "clean")
    _clean(str(dump), out)
    assert _clean(str(dump), out) is None  # unchanged: skipped
    st = dump.stat()
    data = bytearray(dump.read_bytes())
    i = data.index(b'"title": "') + len(b'"title": "')
    data[i] = ord("X") if data[i] != ord("X") else ord("Y")  # same size
    dump.write_bytes(bytes(data))
    os.utime(dump, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert _clean(str(dump), out) is not None  # content changed: rerun
    # taken while clean streamed the dump (in its workers), equal to the one a skip check computes
    digest = storage.require_success(out)["inputs"][0]["digest"]
    assert digest == storage.raw_fingerprint(str(dump)) and digest.startswith("content:xxh3-chunks")
    assert _clean(str(dump), out) is None
    two = str(tmp_path / "r2" / "clean")
    run_clean([str(dump)], two, CleanConfig(workers=2))
    assert storage.require_success(two)["inputs"][0]["digest"] == digest


def test_dead_attempts_tmp_files_swept_and_modes_consistent(tmp_path, sample_dump):
    out = tmp_path / "r" / "clean"
    out.mkdir(parents=True)
    leftover = out / ".conversations.jsonl.gz.k2j3.tmp"
    leftover.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        _clean(sample_dump, str(out))
    finally:
        os.umask(old)
    assert not leftover.exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {name: 0o644 for name in (*CLEAN_FILES, storage.SUCCESS)}
    manifest = storage.require_success(str(out))
    assert {f["attempt"] for f in manifest["files"]} == {manifest["attempt"]}
    try:  # where the filesystem keeps user xattrs, each file carries the attempt that wrote it
        tags = {name: os.getxattr(out / name, "user.cmv.attempt").decode() for name in CLEAN_FILES}
    except OSError:
        pytest.skip("no user xattrs on this filesystem (the fallback is tested on its own below)")
    assert tags == {name: manifest["attempt"] for name in CLEAN_FILES}


def test_without_user_xattrs_the_write_log_alone_finds_a_replaced_file(tmp_path, monkeypatch):
    import errno

    calls = []

    def no_xattrs(path, *args, **kwargs):
        calls.append(str(path))
        raise OSError(errno.ENOTSUP, "Operation not supported", str(path))

    monkeypatch.setattr(os, "setxattr", no_xattrs)
    out = str(tmp_path / "r" / "clean")
    run = storage.begin_stage("clean", out, inputs=[], config={})
    for name in CLEAN_FILES:
        storage.write_text(storage.join(out, name), name)
    assert len([c for c in calls if Path(c).name in CLEAN_FILES]) == len(CLEAN_FILES)  # each tag was tried
    manifest = storage.finish_stage(run, {}, declared=True)
    assert {f["attempt"] for f in manifest["files"]} == {run.attempt}

    run = storage.begin_stage("clean", out, inputs=[], config={}, force=True)
    for name in CLEAN_FILES:
        storage.write_text(storage.join(out, name), name)
    other = tmp_path / "r" / "clean" / ".other"
    other.write_text("stats.json")  # the same bytes, by another writer: only the write log can tell
    os.replace(other, tmp_path / "r" / "clean" / "stats.json")
    with pytest.raises(errors.OutputError, match="stats.json replaced"):
        storage.finish_stage(run, {}, declared=True)


def test_clean_workers_die_with_a_killed_parent(tmp_path):
    psutil = pytest.importorskip("psutil")
    dump = tmp_path / "big.jsonlist"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "synth_dump.py"), "--threads", "3000", "--output", str(dump)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmv_core.cli",
            "clean",
            "--input",
            str(dump),
            "--output",
            str(tmp_path / "r" / "clean"),
            "--config",
            TINY,
            "--set",
            "clean.workers=2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    children = []
    while time.monotonic() < deadline and len(children) < 2:
        children = [c for c in parent.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
        time.sleep(0.2)
    assert len(children) >= 2, "no worker processes started"
    everyone = parent.children(recursive=True)
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(everyone, timeout=15)
    assert not alive, f"still alive after the parent's SIGKILL: {[p.cmdline() for p in alive]}"


def test_judge_answer_echoing_the_key_is_redacted_before_it_is_stored(tmp_path, monkeypatch):
    from fake_openai_server import FakeOpenAI, Reply, completion

    from cmv_core.judge import stage as judging

    secret = "sk-test-" + "9" * 24
    fmt, gen = str(tmp_path / "format"), str(tmp_path / "generate")
    prompt = [{"role": "user", "content": "CMV: x\n\nI believe x."}]
    run = storage.begin_stage("format", fmt, inputs=[], config={}, run_id="t")
    storage.write_jsonl(
        storage.join(fmt, "test.jsonl"),
        [{"id": "t0:c0", "thread_id": "t0", "messages": prompt + [{"role": "assistant", "content": "h"}]}],
    )
    storage.finish_stage(run, {})
    run = storage.begin_stage("generate", gen, inputs=[fmt], config={}, run_id="t")
    storage.write_jsonl(
        storage.join(gen, "generations.jsonl"),
        [
            {
                "id": "t0:c0",
                "thread_id": "t0",
                "model": "base",
                "messages": prompt,
                "response": "r",
                "finish_reason": "stop",
                "prompt_tokens": 5,
                "completion_tokens": 1,
            }
        ],
    )
    storage.finish_stage(run, {})
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    # a 200 answer that echoes the key (and is no verdict, so it is kept as the raw answer)
    with FakeOpenAI(lambda body, n: Reply(body=completion(f"your key is {secret}, I refuse"))) as srv:
        cfg = judging.JudgeConfig(
            backend="openai",
            model="gpt-4o-mini",
            base_url=srv.base_url,
            max_retries=0,
            parse_retries=0,
            calibration=False,
            bootstrap_samples=10,
            timeout_s=5.0,
        )
        with pytest.raises(errors.CmvError):  # every call unparseable: the stage fails, after storing them
            judging.run_judge(gen, fmt, str(tmp_path / "judge"), cfg)
    stored = [p for p in (tmp_path / "judge").rglob("*") if p.is_file()]
    assert any("your key is ***" in p.read_text(errors="replace") for p in stored)
    assert not [p for p in stored if secret in p.read_text(errors="replace")]


def test_sigterm_to_cmv_run_reaches_the_running_stage(tmp_path, sample_dump):
    """`cmv run` passes SIGTERM on to the stage it runs: the stage stops in its own one line with 143
    and releases its lease (a killed child would leave it held), so the rerun starts at once."""
    fifo = tmp_path / "dump.jsonlist"
    os.mkfifo(fifo)  # clean blocks opening it: a stage caught mid-run
    root = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmv_core.cli",
            "run",
            "--config",
            TINY,
            "--root",
            str(root),
            "--run-id",
            "t",
            "--stages",
            "clean",
            "--input",
            str(fifo),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out = root / "t" / "clean"
    deadline = time.monotonic() + 60
    while not (out / "_LEASE").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (out / "_LEASE").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "cmv clean: error: stopped by SIGTERM" in err and "stage clean failed with exit code 143" in err
    assert not (out / "_SUCCESS").exists() and not (out / "_LEASE").exists()
    rerun = run_cmv(
        "run", "--config", TINY, "--root", str(root), "--run-id", "t", "--stages", "clean", "--input", sample_dump
    )
    assert rerun.returncode == 0 and (out / "_SUCCESS").exists()
