"""The rendered Jobs, executed: each Job's container command, arguments and environment (the ConfigMap's
values and test Secrets resolved, `$(VAR)` expanded the way the kubelet does, the image's ENTRYPOINT read
from its Dockerfile) run as local processes against an S3-protocol server on loopback. This proves the
manifests' commands run the pipeline, not just that they are valid YAML.

What differs from a pod, on purpose: `python3`/`torchrun` are this venv's, the working directory is the
repository (the image's /app), HOME, CMV_CACHE and HF_HOME are the test's (the tiny model's cache is shared), the
train Job's master address <job>-0.<service> is mapped to 127.0.0.1 with a free port, and each simulated
train pod gets a TMPDIR of its own (a pod's /tmp is its own emptyDir)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from cmv_core import storage
from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TEST_SECRETS = {"cmv-s3": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}}


# ---------------------------------------------------------------- a pod, as local processes


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, `$$` is a literal `$`, the rest stays."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def image_env_and_entrypoint(image: str) -> tuple[dict[str, str], list[str]]:
    stage = re.match(r"(?:.*/)?cmv-(\w+)(?::.*)?$", image).group(1)
    parser = DockerfileParser(path=str(REPO / "images" / f"{stage}.Dockerfile"))
    return dict(parser.envs), json.loads(
        parser.structure[[i["instruction"] for i in parser.structure].index("ENTRYPOINT")]["value"]
    )


def pod_process(job: dict, config: dict, secrets: dict, index: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of the main container of the Job's pod number ``index``."""
    pod = job["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "main")
    image_env, entrypoint = image_env_and_entrypoint(container["image"])
    env = {"PATH": os.environ["PATH"], **image_env}
    for key in ("HOME", "CMV_CACHE", "TMPDIR", "HF_HUB_OFFLINE"):  # the test's caches, not the image's
        if key in os.environ:
            env[key] = os.environ[key]
        else:
            env.pop(key, None)
    if job["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = str(index or 0)
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == config["metadata"]["name"]
            env.update(config["data"])
        else:
            ref = source["secretRef"]
            if ref["name"] in secrets:
                env.update(secrets[ref["name"]])
            else:
                assert ref.get("optional"), f"Secret {ref['name']} is required and not given"
    labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path).group(1)
            env[item["name"]] = labels[key]
    if "HF_HOME" in env:  # the pod's hf-cache volume (/cache) is the test's own cache here
        env["HF_HOME"] = os.environ.get("HF_HOME") or str(Path(env.get("HOME") or "/tmp") / ".cache" / "huggingface")
    argv = [expand(a, env) for a in (container.get("command") or entrypoint) + container.get("args", [])]
    argv[0] = {"python3": sys.executable, "torchrun": str(VENV_BIN / "torchrun")}.get(argv[0], argv[0])
    return argv, env


def run_job(job: dict, config: dict, secrets=TEST_SECRETS, timeout: float = 900) -> subprocess.CompletedProcess:
    argv, env = pod_process(job, config, secrets)
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_run(overlay: str, **settings: str) -> k8s_render.Plan:
    return k8s_render.plan(k8s_render.render_objects(overlay, settings=settings))


def tiny_settings(root: str, run_id: str, **extra: str) -> dict[str, str]:
    return {
        "RUN_ID": run_id,
        "ARTIFACT_ROOT": root,
        "RAW_INPUT": "cmv_core/data/sample_cmv.jsonlist",
        "CMV_RECIPE": "configs/tiny.yaml",
        "CMV_MODEL": "embedded:tiny-random-llama",
        **extra,
    }


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


# ---------------------------------------------------------------- the harness itself


def test_expansion_follows_kubernetes_rules():
    env = {"A": "x", "B": "$(A)"}
    assert expand("$(A)/$(B)/$(C)/$$(A)/$$", env) == "x/$(A)/$(C)/$(A)/$"


# ---------------------------------------------------------------- default suite: fast


def test_clean_job_as_rendered_writes_its_stage_to_s3(s3_bucket):
    run_id = f"c-{uuid.uuid4().hex[:6]}"
    run = render_run(
        "dev", **tiny_settings(f"{s3_bucket}/runs", run_id, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])
    )
    proc = run_job(run.job("clean"), run.config)
    assert proc.returncode == 0, explain(proc)
    manifest = storage.read_json(f"{s3_bucket}/runs/{run_id}/clean/_SUCCESS")
    assert manifest["stage"] == "clean" and manifest["run_id"] == run_id
    assert "conversations.jsonl.gz" in {f["path"] for f in manifest["files"]}


def test_a_stage_started_early_waits_for_its_input_then_fails_clearly(s3_bucket):
    run_id = f"w-{uuid.uuid4().hex[:6]}"
    run = render_run(
        "dev",
        **tiny_settings(f"{s3_bucket}/runs", run_id, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], INPUT_WAIT_S="2"),
    )
    job = run.job("format")
    proc = run_job(job, run.config)
    missing = f"{s3_bucket}/runs/{run_id}/clean/_SUCCESS"
    assert f"waiting up to 2 s for {missing}" in proc.stderr, explain(proc)
    assert f"gave up after 2 s waiting for {missing}" in proc.stderr
    # ...with the exit code the Job's pod failure policy turns into "fail now, no retries".
    fail_now = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"][0]
    assert proc.returncode in fail_now["onExitCodes"]["values"]
    assert not storage.exists(f"{s3_bucket}/runs/{run_id}/format/_SUCCESS")


# ---------------------------------------------------------------- slow: the whole pipeline, multi-node training


@pytest.mark.slow
def test_rendered_jobs_run_the_whole_pipeline(s3_bucket, tiny_model_dir):
    run_id = f"p-{uuid.uuid4().hex[:6]}"
    root = f"{s3_bucket}/runs"
    run = render_run(
        "dev",
        **tiny_settings(root, run_id, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], MASTER_PORT=str(free_port())),
    )
    for stage in k8s_names.STAGES:
        job = run.job(stage)
        if stage == "train":
            argv, env = pod_process(job, run.config, TEST_SECRETS, index=0)
            assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
            env["MASTER_ADDR"] = "127.0.0.1"
            argv = [expand(a, env) if "--master-addr" not in a else "--master-addr=127.0.0.1" for a in argv]
            proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        else:
            proc = run_job(job, run.config)
        assert proc.returncode == 0, f"{stage}: {explain(proc)}"
        assert storage.exists(f"{root}/{run_id}/{stage}/_SUCCESS"), stage
    report = storage.read_text(f"{root}/{run_id}/judge/report.md")
    assert report.strip()
    assert storage.exists(f"{root}/{run_id}/judge/report.json")


@pytest.mark.slow
def test_multinode_train_job_for_two_nodes_trains_as_two_processes(s3_bucket, format_output, tmp_path):
    """The multinode overlay's train Job at NNODES=2: pod 0 and pod 1 as two local processes, each with its
    own JOB_COMPLETION_INDEX, meeting at pod 0's address (mapped to loopback); one model comes out."""
    run_id = f"m-{uuid.uuid4().hex[:6]}"
    root = f"{s3_bucket}/runs"
    storage.upload_dir(format_output, f"{root}/{run_id}/format")
    run = render_run(
        "multinode",
        **tiny_settings(
            root, run_id, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], NNODES="2", MASTER_PORT=str(free_port())
        ),
    )
    job = run.job("train")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    master = f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
    procs = []
    for index in range(2):
        argv, env = pod_process(job, run.config, TEST_SECRETS, index=index)
        assert env["JOB_COMPLETION_INDEX"] == str(index) and f"--node-rank={index}" in argv
        assert env["MASTER_ADDR"] == master and f"--master-addr={master}" in argv
        assert "--nnodes=2" in argv
        env["MASTER_ADDR"] = "127.0.0.1"  # DNS of the headless Service -> loopback
        env["TMPDIR"] = str(tmp_path / f"pod-{index}")  # each pod has its own /tmp (an emptyDir), so its own scratch
        os.makedirs(env["TMPDIR"])
        argv = ["--master-addr=127.0.0.1" if a == f"--master-addr={master}" else a for a in argv]
        procs.append(
            subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
        outputs.append(out)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-6000:] for o in outputs)
    manifest = storage.read_json(f"{root}/{run_id}/train/_SUCCESS")
    files = {f["path"] for f in manifest["files"]}
    assert any(f.startswith("model/") for f in files) and "metrics.json" in files
    metrics = storage.read_json(f"{root}/{run_id}/train/metrics.json")
    assert json.dumps(metrics)  # written once, by rank 0, for a world of 2 processes
    world = [v for k, v in _flatten(metrics).items() if k.endswith("world_size")]
    assert world and world[0] == 2, f"metrics.json does not record a world of 2 processes: {world}"


def _flatten(obj, prefix="") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out
