"""What a real cluster holds the manifests to: the JobSet overlay (gang restart on a drain, pod DNS for the
rendezvous, 1 -> N nodes one value) validated against the JobSet project's CRD; Pod Security "restricted" on
every pod template of every overlay; images always tagged; each Job bounded in time; train pods sized by
their GPUs; nothing named the same by two overlays."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import crd_schema
import jsonschema
import pytest

from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render
from cmv_core.k8s import settings as k8s_settings

REPO = Path(__file__).resolve().parents[1]
TAG = "t-1234567"


def render(overlay: str, **settings: str) -> list[dict]:
    return k8s_render.render_objects(overlay, settings=settings, tag=TAG)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in k8s_names.OVERLAYS}


def workload(objects: list[dict], stage: str) -> dict:
    return next(
        o
        for o in objects
        if o["kind"] in k8s_names.WORKLOAD_KINDS and o["metadata"].get("labels", {}).get("cmv.io/stage") == stage
    )


def main_container(obj: dict) -> dict:
    return next(c for c in k8s_names.pod_template(obj)["spec"]["containers"] if c["name"] == "main")


def pod_templates(obj: dict) -> list[dict]:
    if obj["kind"] == "JobSet":
        return [r["template"]["spec"]["template"] for r in obj["spec"]["replicatedJobs"]]
    if obj["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        return [obj["spec"]["template"]]
    if obj["kind"] == "Pod":
        return [obj]
    return []


# ---------------------------------------------------------------- Pod Security "restricted"

RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(template: dict) -> list[str]:
    """The Pod Security Standards' "restricted" profile (baseline included), as the admission plugin checks it."""
    spec, out = template["spec"], []
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"{key} is set")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']} is of type {sorted(kinds)}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc, name = c.get("securityContext") or {}, c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp!r}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
    return out


@pytest.mark.parametrize("overlay", k8s_names.OVERLAYS)
def test_every_pod_template_meets_pod_security_restricted(rendered, overlay):
    templates = [(o["kind"], o["metadata"]["name"], t) for o in rendered[overlay] for t in pod_templates(o)]
    assert len(templates) >= 5
    for kind, name, template in templates:
        assert restricted_violations(template) == [], f"{overlay}: {kind}/{name}"


def test_the_restricted_check_catches_violations(rendered):
    template = copy.deepcopy(k8s_names.pod_template(workload(rendered["gpu"], "train")))
    assert restricted_violations(template) == []
    template["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    template["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    del template["spec"]["securityContext"]["seccompProfile"]
    assert restricted_violations(template) == [
        "volume host is of type ['hostPath']",
        "main: allowPrivilegeEscalation is not false",
        "main: seccompProfile is None",
    ]


# ---------------------------------------------------------------- JobSet


def test_jobset_validates_against_its_crd_and_the_check_rejects_mistakes(rendered):
    jobset = workload(rendered["jobset"], "train")
    assert jobset["kind"] == "JobSet" and jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    crd_schema.validate(jobset)
    misspelt = copy.deepcopy(jobset)
    misspelt["spec"]["failurePolicy"]["maxRestart"] = 3
    bad_enum = copy.deepcopy(jobset)
    bad_enum["spec"]["failurePolicy"]["restartStrategy"] = "Blocking"
    bad_action = copy.deepcopy(jobset)
    bad_action["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartJobSetIgnoringMaxRestarts"
    deep_typo = copy.deepcopy(jobset)  # inside the pod template the CRD embeds
    k8s_names.pod_template(deep_typo)["spec"]["containers"][0]["resource"] = {}
    wrong_type = copy.deepcopy(jobset)
    wrong_type["spec"]["network"]["enableDNSHostnames"] = "yes"
    for bad, word in (
        (misspelt, "maxRestart"),
        (bad_enum, "Blocking"),
        (bad_action, "RestartJobSetIgnoring"),
        (deep_typo, "resource"),
        (wrong_type, "yes"),
    ):
        with pytest.raises(jsonschema.ValidationError, match=word):
            crd_schema.validate(bad)


def test_jobset_failure_policy_restarts_the_gang_and_ignores_disruptions(rendered):
    spec = workload(rendered["jobset"], "train")["spec"]
    policy = spec["failurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate" and policy["maxRestarts"] >= 1
    rules = {r["name"]: r for r in policy["rules"]}
    assert rules["not-retryable"]["action"] == "FailJobSet"
    assert rules["disruption-or-sigterm"]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert rules["failure"]["action"] == "RestartJobSet"
    assert [r["name"] for r in policy["rules"]] == ["not-retryable", "disruption-or-sigterm", "failure"]  # first match
    inner = spec["replicatedJobs"][0]["template"]["spec"]
    assert inner["backoffLimit"] == 0  # every pod failure goes to the JobSet, which restarts all pods at once
    pfp = inner["podFailurePolicy"]["rules"]
    assert all(r["action"] == "FailJob" for r in pfp)
    assert pfp[0] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert pfp[1]["onExitCodes"]["values"] == [143]
    # The exit-2 rule is the one the JobSet's message pattern names (the Job controller's message gives its index).
    assert pfp[2]["onExitCodes"]["values"] == [2]
    assert rules["not-retryable"]["onJobFailureMessagePatterns"] == ["exit code 2 matching FailJob rule at index 2"]
    assert spec["network"]["enableDNSHostnames"] is True


def test_jobset_master_addr_is_pod_zero_of_the_jobset_and_scaling_is_one_value():
    objects = render("jobset", RUN_ID="js-3", NNODES="4", MASTER_PORT="29600")
    jobset = workload(objects, "train")
    name = jobset["metadata"]["name"]
    assert name == "cmv-train-js-3"
    inner = jobset["spec"]["replicatedJobs"][0]
    assert inner["name"] == "node" and inner["replicas"] == 1
    assert inner["template"]["spec"]["completions"] == inner["template"]["spec"]["parallelism"] == 4
    assert inner["template"]["spec"]["completionMode"] == "Indexed"
    c = main_container(jobset)
    env = {e["name"]: e for e in c["env"]}
    assert (
        env["JOBSET_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
    )
    # <jobset>-<replicated job>-<job index>-<pod index>.<subdomain = jobset name>
    assert env["MASTER_ADDR"]["value"] == "$(JOBSET_NAME)-node-0-0.$(JOBSET_NAME)"
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in c["args"] and "--master-port=$(MASTER_PORT)" in c["args"]
    assert c["ports"] == [{"name": "rendezvous", "containerPort": 29600}]
    assert k8s_render.plan(objects).settings["MASTER_PORT"] == "29600"


def test_jobset_pod_template_is_the_indexed_jobs(rendered):
    """One pod definition in two files (base/train, base/train-jobset): they must not drift apart."""
    job = k8s_names.pod_template(workload(rendered["multinode"], "train"))
    jobset = k8s_names.pod_template(workload(rendered["jobset"], "train"))

    def comparable(template: dict) -> dict:
        t = copy.deepcopy(template)
        t["spec"].pop("subdomain", None)
        t["spec"].pop("affinity", None)
        t["metadata"]["labels"].pop("cmv.io/run-id")
        t["metadata"]["labels"].pop(k8s_names.SETTINGS_LABEL, None)
        c = t["spec"]["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] not in ("JOB_NAME", "JOBSET_NAME", "MASTER_ADDR")]
        c["envFrom"][0]["configMapRef"]["name"] = "cmv-pipeline"  # its hash: the overlays' settings differ
        return t

    assert comparable(job) == comparable(jobset)


def test_kueue_queue_label_is_one_setting():
    jobset = workload(render("jobset", KUEUE_QUEUE="team-a"), "train")
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    crd_schema.validate(jobset)
    assert "kueue.x-k8s.io/queue-name" not in workload(render("jobset"), "train")["metadata"]["labels"]


# ---------------------------------------------------------------- hygiene


def untagged_tree(tmp_path) -> Path:
    import shutil

    tree = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", tree)
    settings = tree / "overlays" / "gpu" / "settings" / "kustomization.yaml"
    settings.write_text(re.sub(r"\n  newTag: [\w.-]+", "", settings.read_text()))
    return tree


def test_rendering_refuses_images_without_a_tag_or_tagged_latest(monkeypatch, tmp_path):
    monkeypatch.setattr(k8s_render, "default_tag", lambda: None)
    with pytest.raises(
        k8s_names.K8sError, match="images without a tag, or tagged latest: localhost:5000/cmv-clean:set-a-tag"
    ):
        k8s_render.render("gpu")  # the overlay's placeholder, never rendered
    with pytest.raises(k8s_names.K8sError, match="images without a tag, or tagged latest: reg.example/cmv-clean,"):
        k8s_render.render("gpu", registry="reg.example", k8s_dir=untagged_tree(tmp_path))
    with pytest.raises(k8s_names.K8sError, match="tagged latest"):
        k8s_render.render("gpu", tag="latest")
    objects = k8s_render.render_objects("gpu", tag="abc1234")
    assert {main_container(workload(objects, s))["image"] for s in k8s_names.STAGES} == {
        f"localhost:5000/cmv-{s}:abc1234" for s in k8s_names.STAGES
    }


def test_the_default_tag_is_git_describe_as_make_tags():
    import subprocess

    want = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert k8s_render.default_tag() == want
    make = subprocess.run(["make", "-n", "image-clean"], cwd=REPO, capture_output=True, text=True).stdout
    assert f"-t localhost:5000/cmv-clean:{want} ." in make
    assert "docker info" in make  # docker-check asks the engine, not only whether a CLI exists


def test_no_latest_anywhere():
    files = [
        *(REPO / "k8s").rglob("*.yaml"),
        *(REPO / "images").glob("*.Dockerfile"),
        REPO / "Makefile",
        REPO / "images" / "docker-bake.hcl",
    ]
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"(:latest\b|newTag: latest|default = \"latest\")", line) and not line.lstrip().startswith("#")
    ]
    assert hits == []


def test_each_overlay_has_its_own_default_run_id(rendered):
    ids = {overlay: k8s_render.plan(objects).run_id for overlay, objects in rendered.items()}
    assert len(set(ids.values())) == len(ids), ids
    names = {
        overlay: {o["metadata"]["name"] for o in objects if o["kind"] in k8s_names.WORKLOAD_KINDS}
        for overlay, objects in rendered.items()
    }
    overlays = list(names)
    for i, a in enumerate(overlays):
        for b in overlays[i + 1 :]:
            assert not names[a] & names[b], (a, b)


@pytest.mark.parametrize("overlay", k8s_names.OVERLAYS)
def test_every_job_is_bounded_in_time(rendered, overlay):
    for obj in rendered[overlay]:
        specs = (
            [r["template"]["spec"] for r in obj["spec"]["replicatedJobs"]]
            if obj["kind"] == "JobSet"
            else [obj["spec"]]
            if obj["kind"] == "Job"
            else []
        )
        for spec in specs:
            assert spec.get("activeDeadlineSeconds", 0) > 0, f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("overlay", ["gpu", "multinode", "jobset"])
def test_train_cpu_memory_and_shm_follow_the_gpus_per_node(overlay):
    settings = k8s_settings.run_settings(gpus_per_node=8)
    train = workload(k8s_render.render_objects(overlay, settings=settings, tag=TAG), "train")
    resources = main_container(train)["resources"]
    assert resources["requests"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert resources["limits"] == {"cpu": "64", "memory": "768Gi", "nvidia.com/gpu": "8"}
    shm = next(v for v in k8s_names.pod_template(train)["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    one = main_container(workload(render(overlay), "train"))["resources"]
    assert one["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    # An explicit value wins over the derived one.
    assert k8s_settings.run_settings(gpus_per_node=8, extra=["TRAIN_CPU=48"])["TRAIN_CPU"] == "48"


def test_master_port_reaches_the_container_and_the_service():
    objects = render("multinode", MASTER_PORT="29777")
    train = workload(objects, "train")
    service = next(o for o in objects if o["kind"] == "Service")
    assert main_container(train)["ports"] == [{"name": "rendezvous", "containerPort": 29777}]
    assert service["spec"]["ports"][0]["port"] == 29777 and service["spec"]["ports"][0]["targetPort"] == "rendezvous"


def test_hf_home_is_on_a_volume_sized_by_the_settings():
    objects = render("gpu", HF_CACHE_SIZE="80Gi")
    for stage in ("format", "train", "generate"):
        obj = workload(objects, stage)
        c = main_container(obj)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env["HF_HOME"] == "/cache/huggingface", stage
        assert {"name": "hf-cache", "mountPath": "/cache"} in c["volumeMounts"], stage
        cache = next(v for v in k8s_names.pod_template(obj)["spec"]["volumes"] if v["name"] == "hf-cache")
        assert cache["emptyDir"]["sizeLimit"] == "80Gi", stage


def test_train_service_does_not_publish_not_ready_pods(rendered):
    """A dying train pod must not stay published as MASTER_ADDR (the submitter also waits for it to be gone)."""
    service = next(o for o in rendered["multinode"] if o["kind"] == "Service")
    assert service["spec"].get("publishNotReadyAddresses") in (None, False)
