"""Shared fixtures: the tiny model, an S3-protocol server on loopback, the bundled sample run through clean/format."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def run_cmv(
    *args: str, check: bool = True, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run the real ``cmv`` CLI in a subprocess, as a user or a Job would."""
    proc = subprocess.run(
        [sys.executable, "-m", "cmv_core.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cmv {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs 2 workers, --dist loadgroup): a module's tests go to one worker,
    so that its module fixtures (servers, trained models) are built once, and every test of the one
    `cmv run` (tiny_pipeline_run) goes to the same worker, so that the run is made once."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "tiny_pipeline_run" if "tiny_pipeline_run" in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from cmv_core.models import TINY_RANDOM, resolve_model

    return resolve_model(TINY_RANDOM)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol endpoint (moto server mode) on loopback for boto3."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    from cmv_core import storage

    name = f"cmv-test-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def sample_dump() -> str:
    path = REPO / "cmv_core" / "data" / "sample_cmv.jsonlist"
    assert path.exists(), f"bundled sample missing: {path}"
    return str(path)


@pytest.fixture(scope="session")
def clean_output(tmp_path_factory, sample_dump) -> str:
    out = tmp_path_factory.mktemp("run") / "clean"
    run_cmv("clean", "--input", sample_dump, "--output", str(out), "--config", str(CONFIGS / "tiny.yaml"))
    return str(out)


@pytest.fixture(scope="session")
def format_output(clean_output, tiny_model_dir) -> str:
    out = Path(clean_output).parent / "format"
    run_cmv("format", "--input", clean_output, "--output", str(out), "--config", str(CONFIGS / "tiny.yaml"))
    return str(out)


TINY_RUN_ID = "real"


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory) -> tuple[Path, str]:
    """(root, stdout) of one `cmv run` of configs/tiny.yaml, every stage (dpo included): <root>/real/<stage>/.
    One run per session because it is the suite's most expensive fixture; the tests that read it each assert
    something else, and a test that changes an output puts it back before it ends."""
    root = tmp_path_factory.mktemp("tiny-run")
    proc = run_cmv("run", "--config", str(CONFIGS / "tiny.yaml"), "--root", str(root), "--run-id", TINY_RUN_ID)
    return root, proc.stdout
