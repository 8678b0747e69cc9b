"""The kustomize tree: every kustomization renders with `kubectl kustomize` and every object validates
against the newest Kubernetes schema kubernetes-validate ships, unknown fields rejected; run ids and the
node count are each set in one place; Jobs carry the security, retry and GPU settings the design asks for."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import crd_schema
import pytest
import yaml

from cmv_core import cli
from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render

kubernetes_validate = pytest.importorskip("kubernetes_validate")
from kubernetes_validate.utils import latest_version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMA = latest_version()
SECRET_WORDS = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.I)


def kustomization_dirs() -> list[str]:
    out = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "Component":  # components build only inside others
            out.append(str(path.parent.relative_to(REPO)))
    return out


def build(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(k8s_render.kustomize(REPO / rel)) if d]


def jobs(objects: list[dict]) -> dict[str, dict]:
    """Each stage's workload: a Job, or the jobset overlay's train JobSet."""
    return {
        o["metadata"]["labels"]["cmv.io/stage"]: o
        for o in objects
        if o["kind"] in k8s_names.WORKLOAD_KINDS and "cmv.io/stage" in o["metadata"].get("labels", {})
    }


def main_container(job: dict) -> dict:
    return next(c for c in k8s_names.pod_template(job)["spec"]["containers"] if c["name"] == "main")


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    return {name: build(f"k8s/overlays/{name}") for name in k8s_names.OVERLAYS}


def test_the_tree_has_every_overlay_and_stage():
    dirs = set(kustomization_dirs())
    for overlay in k8s_names.OVERLAYS:
        assert f"k8s/overlays/{overlay}" in dirs
        for stage in k8s_names.STAGES:
            assert f"k8s/overlays/{overlay}/{stage}" in dirs
    assert "k8s/overlays/dev/minio" in dirs and "k8s/base" in dirs


@pytest.mark.parametrize("rel", kustomization_dirs())
def test_renders_and_validates_strict(rel):
    objects = build(rel)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in crd_schema.kinds():  # JobSet: its project's published CRD
            crd_schema.validate(obj)
        else:
            kubernetes_validate.validate(obj, SCHEMA, strict=True)


def test_strict_validation_rejects_unknown_fields(overlays):
    # The check above can fail: a misspelt field is an error, not ignored.
    job = copy.deepcopy(jobs(overlays["gpu"])["train"])
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, SCHEMA, strict=True)


def test_stage_kustomizations_split_the_pipeline_exactly(overlays):
    """overlays/<o>/<stage> applies one stage: together they are the whole overlay (less dev's MinIO)."""
    for overlay, whole in overlays.items():
        parts: dict[tuple, dict] = {}
        for stage in k8s_names.STAGES:
            objects = build(f"k8s/overlays/{overlay}/{stage}")
            kinds = sorted(o["kind"] for o in objects)
            train = ["ConfigMap", "JobSet"] if overlay == "jobset" else ["ConfigMap", "Job", "Service"]
            assert kinds == (train if stage == "train" else ["ConfigMap", "Job"])
            assert {
                o["metadata"].get("labels", {}).get("cmv.io/stage") for o in objects if o["kind"] != "ConfigMap"
            } == {stage}
            for o in objects:
                parts[(o["kind"], o["metadata"]["name"])] = o
        expected = {
            (o["kind"], o["metadata"]["name"]): o
            for o in whole
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/name") != "cmv-minio"
        }
        canon = lambda objs: {f"{k[0]}/{k[1]}": json.dumps(v, sort_keys=True) for k, v in objs.items()}  # noqa: E731
        assert canon(parts) == canon(expected), overlay


def test_run_id_and_node_count_are_each_set_in_one_place():
    objects = k8s_render.render_objects("multinode", settings={"RUN_ID": "exp-7", "NNODES": "3"})
    run = k8s_render.plan(objects)
    assert run.run_id == "exp-7" and run.settings["NNODES"] == "3"
    names = {o["metadata"]["name"] for o in objects if o["kind"] in ("Job", "Service")}
    assert names == {f"cmv-{s}-exp-7" for s in k8s_names.STAGES}
    train = run.job("train")
    service = next(o for o in objects if o["kind"] == "Service")
    assert train["spec"]["completions"] == train["spec"]["parallelism"] == 3
    assert train["spec"]["completionMode"] == "Indexed"
    assert train["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == "cmv-train-exp-7"
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = train["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    for o in objects:
        if o["kind"] in ("Job", "Service", "ConfigMap"):
            assert o["metadata"]["labels"]["cmv.io/run-id"] == "exp-7"
    for stage in k8s_names.STAGES:
        assert run.job(stage)["spec"]["template"]["metadata"]["labels"]["cmv.io/run-id"] == "exp-7"
    # The repository sets the node count once: one NNODES= line per overlay chain, no literal sizes.
    literal = [
        p for p in K8S.rglob("*.yaml") if re.search(r"^\s*(completions|parallelism): [2-9]", p.read_text(), re.M)
    ]
    assert not literal, f"train size written outside pipeline.env: {literal}"
    nnodes = [p.relative_to(K8S) for p in K8S.rglob("pipeline.env") if re.search(r"^NNODES=", p.read_text(), re.M)]
    assert sorted(map(str, nnodes)) == [
        "base/pipeline/pipeline.env",
        "overlays/jobset/settings/pipeline.env",
        "overlays/multinode/settings/pipeline.env",
    ]
    # ...and from 1 to N nodes it is that one value (the gpu overlay has the same Job at NNODES=1).
    gpu = k8s_render.plan(k8s_render.render_objects("gpu", settings={"RUN_ID": "exp-7"})).job("train")
    assert gpu["spec"]["completions"] == 1

    def strip(job):  # what may differ: the size, multinode's anti-affinity, the ConfigMap's content hash
        spec = {
            **job["spec"],
            "completions": 0,
            "parallelism": 0,
            "template": {**job["spec"]["template"], "spec": {**job["spec"]["template"]["spec"], "affinity": None}},
        }
        text = re.sub(r"cmv-pipeline-\w+", "cmv-pipeline", json.dumps(spec, sort_keys=True))
        return re.sub(r"\"cmv.io/settings-hash\": \"\w+\"", "", text)  # the gang size is part of the settings

    assert strip(gpu) == strip(train)


def test_gpus_per_node_follow_nproc_per_node():
    run = k8s_render.plan(k8s_render.render_objects("multinode", settings={"NPROC_PER_NODE": "8"}))
    resources = main_container(run.job("train"))["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "8"


def test_two_runs_never_share_an_object():
    a = k8s_render.render_objects("gpu", settings={"RUN_ID": "run-a"})
    b = k8s_render.render_objects("gpu", settings={"RUN_ID": "run-b"})
    names = lambda objs: {(o["kind"], o["metadata"]["name"]) for o in objs}  # noqa: E731
    assert not names(a) & names(b)


def test_jobs_security_retries_and_resources(overlays):
    for overlay, objects in overlays.items():
        stage_jobs = jobs(objects)
        assert sorted(stage_jobs) == sorted(k8s_names.STAGES)
        config = next(
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("cmv-pipeline")
        )
        assert not [k for k in config["data"] if SECRET_WORDS.search(k)], "secrets never in the ConfigMap"
        assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the user, never rendered"
        for stage, job in stage_jobs.items():
            spec, pod = job["spec"], k8s_names.pod_template(job)["spec"]
            where = f"{overlay}/{stage}"
            assert spec["ttlSecondsAfterFinished"] > 0, where
            if job["kind"] == "Job":  # the JobSet's retries: test_k8s_cluster.py
                assert spec["backoffLimit"] >= 1, where
                rules = spec["podFailurePolicy"]["rules"]
                assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules, where
                fail = [r for r in rules if r["action"] == "FailJob"]
                assert fail and fail[0]["onExitCodes"]["values"] == [2], where  # cmv's exit code for bad input
            assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            c = main_container(job)
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/cmv"} <= mounts, where  # writable places on a read-only root
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            gpu = c["resources"]["limits"].get("nvidia.com/gpu")
            if stage in ("train", "generate"):
                assert "/dev/shm" in mounts, where
                shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
                assert shm["emptyDir"]["medium"] == "Memory", where
                assert (gpu is None) == (overlay == "dev"), where
                if overlay != "dev":
                    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            else:
                assert gpu is None, where
            refs = [e["secretRef"]["name"] for e in c["envFrom"] if "secretRef" in e]
            assert "cmv-s3" in refs, where
            assert ("cmv-openai" in refs) == (stage == "judge"), where
            assert c["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"], where


def test_secret_examples_name_every_key_without_values(overlays):
    examples = {p.name.split(".")[0]: p for p in (K8S / "secrets").glob("*.env.example")}
    assert sorted(examples) == ["hf", "openai", "s3"]
    keys = {}
    for name, path in examples.items():
        lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
        assert lines and all(re.fullmatch(r"[A-Z_]+=", ln) for ln in lines), f"{path} must have keys, no values"
        assert f"kubectl create secret generic cmv-{name} --from-env-file=k8s/secrets/{name}.env" in path.read_text()
        keys[f"cmv-{name}"] = {ln[:-1] for ln in lines}
    # Every secretKeyRef in the manifests (MinIO's root user) names a key the example documents.
    for obj in overlays["dev"]:
        for ref in re.findall(r"'secretKeyRef': \{'key': '(\w+)', 'name': '([\w-]+)'\}", str(obj)):
            assert ref[0] in keys[ref[1]]
    ignore = (K8S / "secrets" / ".gitignore").read_text()
    assert "*.env" in ignore


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def flags(argv: list[str]) -> dict[str, str]:
    """--a=b / --a b pairs of an argument list."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        elif arg.startswith("--") and i + 1 < len(argv):
            out[arg] = argv[i + 1]
            i += 1
        i += 1
    return out


@pytest.mark.parametrize("overlay", k8s_names.OVERLAYS)
def test_job_arguments_match_the_local_runner(overlays, overlay):
    """The Jobs pass each stage the same inputs and output that `cmv run` does, for the same root and run."""
    run = k8s_render.plan(overlays[overlay])
    env = run.settings
    for stage in k8s_names.STAGES:
        c = main_container(run.job(stage))
        args = [expand(a, env) for a in c["args"]]
        if stage == "train":
            assert c["command"] == ["python3", "-m", "cmv_core.train.torchrun"]
            args = args[args.index("jobs.train") + 1 :]
        local = cli.stage_argv(stage, env["ARTIFACT_ROOT"], run.run_id, env["CMV_RECIPE"], [env["RAW_INPUT"]])
        assert local[0] == stage
        expected = flags(local[1:])
        got = flags(args)
        for key in ("--input", "--data", "--trained", "--generations", "--output", "--config", "--run-id"):
            assert got.get(key) == expected.get(key), f"{overlay}/{stage} {key}"
        assert got["--set"] == f"model={env['CMV_MODEL']}"
        if stage != "clean":
            assert got["--wait-for-input"] == env["INPUT_WAIT_S"]


def test_train_job_runs_torchrun_with_rank_from_the_completion_index(overlays):
    job = jobs(overlays["multinode"])["train"]
    c = main_container(job)
    args = c["args"]
    for expected in (
        "--nnodes=$(NNODES)",
        "--nproc-per-node=$(NPROC_PER_NODE)",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
    ):
        assert expected in args
    env = {e["name"]: e for e in c["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    # <job>-0.<service>: pod 0's hostname under the headless Service (subdomain = Service = Job name).
    assert env["MASTER_ADDR"]["value"] == "$(JOB_NAME)-0.$(JOB_NAME)"
    assert job["spec"]["template"]["spec"]["subdomain"] == job["metadata"]["name"]
    port = c["ports"][0]["containerPort"]
    config = k8s_render.plan(overlays["multinode"]).settings
    assert str(port) == config["MASTER_PORT"]
    # SIGTERM contract: the trainer checkpoints and exits 143; torchrun and the pod wait long enough for it.
    assert {"action": "Ignore", "onExitCodes": {"containerName": "main", "operator": "In", "values": [143]}} in job[
        "spec"
    ]["podFailurePolicy"]["rules"]
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
    anti = job["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_dev_overlay_is_cpu_minio_and_the_demo_recipe(overlays):
    objects = overlays["dev"]
    settings = k8s_render.plan(objects).settings
    assert settings["CMV_RECIPE"] == "configs/demo.yaml" and (REPO / settings["CMV_RECIPE"]).exists()
    assert (REPO / settings["RAW_INPUT"]).exists(), "the dev dump ships in the image (/app)"
    assert settings["AWS_ENDPOINT_URL"] == "http://cmv-minio:9000"
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Deployment", "cmv-minio"),
        ("Service", "cmv-minio"),
        ("Job", "cmv-minio-bucket"),
        ("PersistentVolumeClaim", "cmv-minio-data"),
    } <= kinds
    bucket_cm = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("cmv-minio-bucket")
    )
    assert settings["ARTIFACT_ROOT"].startswith(f"s3://{bucket_cm['data']['ARTIFACT_BUCKET']}/")
    for settings_file in (K8S / "overlays").glob("*/settings/pipeline.env"):
        text = settings_file.read_text()
        assert not re.search(r"^\w*(KEY|TOKEN|SECRET|PASSWORD)\w*=", text, re.M)


def test_render_cli_sets_run_images_and_stage(tmp_path):
    def cmv(*args):
        return subprocess.run(
            [sys.executable, "-m", "cmv_core.cli", "k8s", "render", *args], capture_output=True, text=True, cwd=tmp_path
        )  # any cwd: the tree is found

    proc = cmv(
        "--overlay",
        "gpu",
        "--run-id",
        "r9",
        "--registry",
        "reg.example/cmv",
        "--tag",
        "abc1234",
        "--recipe",
        "configs/llama-3.2-3b.yaml",
        "--setting",
        "INPUT_WAIT_S=60",
    )
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    run = k8s_render.plan(objects)
    assert run.run_id == "r9" and run.settings["CMV_RECIPE"] == "configs/llama-3.2-3b.yaml"
    assert run.settings["INPUT_WAIT_S"] == "60"
    for stage in k8s_names.STAGES:
        assert main_container(run.job(stage))["image"] == f"reg.example/cmv/cmv-{stage}:abc1234"
    one = [d for d in yaml.safe_load_all(cmv("--overlay", "dev", "--stage", "judge", "--run-id", "r9").stdout) if d]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in one if o["kind"] != "ConfigMap") == [
        ("Job", "cmv-judge-r9")
    ]
    bad = cmv("--overlay", "dev", "--run-id", "Run_1")
    assert bad.returncode == 2 and "run id 'Run_1'" in bad.stderr
    missing = cmv("--overlay", "nope")
    assert missing.returncode == 2 and "no overlay 'nope'" in missing.stderr and "dev" in missing.stderr


@pytest.mark.parametrize("overlay", k8s_names.OVERLAYS)
def test_render_settings_reach_every_overlay_and_stage(overlay):
    # A key the overlay does not have yet (gpu has no AWS_ENDPOINT_URL; dev has one) and one it has.
    settings = {"AWS_ENDPOINT_URL": "http://store.example:9000", "RUN_ID": "setting-42"}
    for stage in (None, "train"):
        run = k8s_render.plan(k8s_render.render_objects(overlay, stage=stage, settings=settings))
        assert run.settings["AWS_ENDPOINT_URL"] == "http://store.example:9000" and run.run_id == "setting-42"
    # The repository's files are untouched: rendering works on a copy.
    assert (
        "setting-42"
        not in (
            K8S / "overlays" / ("gpu" if overlay == "multinode" else overlay) / "settings" / "pipeline.env"
        ).read_text()
    )
