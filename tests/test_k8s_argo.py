"""The Argo engine: the WorkflowTemplate validates against Argo's published CRD, runs the same containers,
arguments and environment as the rendered Jobs, in DAG order, and `cmv k8s submit --engine argo` creates it
(fake API). The slow test executes its steps as local processes, in DAG order, and gets the report."""

from __future__ import annotations

import copy
import os
import subprocess
import uuid

import crd_schema
import jsonschema
import pytest
import yaml
from test_k8s_cluster import restricted_violations

from cmv_core import cli, storage
from cmv_core.k8s import argo as k8s_argo
from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render
from cmv_core.k8s import submit as k8s_submit

TAG = "t-1234567"


def plan(**settings: str) -> k8s_render.Plan:
    return k8s_render.plan(k8s_render.render_objects("jobset", settings=settings, tag=TAG))


def templates(wt: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wt["spec"]["templates"]}


def test_template_validates_and_the_check_rejects_mistakes():
    wt = k8s_argo.workflow_template(plan())
    crd_schema.validate(wt)
    typo = copy.deepcopy(wt)
    typo["spec"]["templates"][1]["retryStrategy"]["limt"] = "2"
    bad_enum = copy.deepcopy(wt)
    bad_enum["spec"]["podGC"]["strategy"] = "OnSuccess"
    deep = copy.deepcopy(wt)
    deep["spec"]["templates"][1]["container"]["envfrom"] = []
    for bad, word in ((typo, "limt"), (deep, "envfrom"), (bad_enum, "OnSuccess")):
        with pytest.raises(jsonschema.ValidationError, match=word):
            crd_schema.validate(bad)


def test_dag_runs_the_five_stages_in_order_with_deadlines_retries_ttl_and_pod_gc():
    wt = k8s_argo.workflow_template(plan(RUN_ID="wf-1"))
    assert wt["metadata"]["name"] == "cmv-pipeline-wf-1"
    assert k8s_argo.dag_order(wt) == k8s_names.STAGES
    spec = wt["spec"]
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlStrategy"]["secondsAfterFailure"] > 0
    assert spec["podGC"] == {"strategy": "OnPodSuccess"}
    assert spec["serviceAccountName"] == "cmv-workflow"
    by_name = templates(wt)
    for stage in k8s_names.STAGES:
        t = by_name[stage]
        assert t["activeDeadlineSeconds"] > 0 and int(t["retryStrategy"]["limit"]) >= 1, stage
    for stage in ("clean", "format", "generate", "judge"):
        assert by_name[stage]["retryStrategy"]["expression"] == "lastRetry.exitCode != '2'"  # exit 2: never again
    train = by_name["train"]["resource"]
    assert train["action"] == "create" and train["setOwnerReference"] is True
    assert train["successCondition"] == "status.terminalState == Completed"
    assert train["failureCondition"] == "status.terminalState == Failed"


def test_the_steps_are_the_rendered_jobs():
    run = plan(RUN_ID="wf-2", NNODES="3")
    by_name = templates(k8s_argo.workflow_template(run))
    for stage in ("clean", "format", "generate", "judge"):
        job_pod = run.job(stage)["spec"]["template"]["spec"]
        t = by_name[stage]
        assert t["container"] == next(c for c in job_pod["containers"] if c["name"] == "main"), stage
        for key in ("volumes", "securityContext", "tolerations", "automountServiceAccountToken"):
            assert t.get(key) == job_pod.get(key), (stage, key)
        assert t["activeDeadlineSeconds"] == run.job(stage)["spec"]["activeDeadlineSeconds"]
        assert t["metadata"]["labels"] == run.job(stage)["spec"]["template"]["metadata"]["labels"]
        assert restricted_violations({"spec": {**t, "containers": [t["container"]]}}) == [], stage
    assert yaml.safe_load(by_name["train"]["resource"]["manifest"]) == run.job("train")


def test_engine_argo_needs_a_jobset_train():
    with pytest.raises(k8s_names.K8sError, match="--overlay jobset"):
        k8s_submit.argo_template(k8s_render.plan(k8s_render.render_objects("gpu", tag=TAG)))


def test_render_engine_argo_prints_the_configmap_and_the_template(capsys):
    assert cli.main(["k8s", "render", "--engine", "argo", "--overlay", "jobset", "--run-id", "wf-3", "--tag", TAG]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "WorkflowTemplate"]
    crd_schema.validate(docs[1])


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    from fake_k8s_api import FakeK8s, kubeconfig

    server = FakeK8s()
    (tmp_path / "kubeconfig").write_text(kubeconfig(server.start()))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    yield server
    server.stop()


def test_submit_engine_argo_creates_the_template_and_a_workflow(fake, capsys):
    args = [
        "k8s",
        "submit",
        "--engine",
        "argo",
        "--overlay",
        "jobset",
        "--run-id",
        "wf-4",
        "--tag",
        TAG,
        "--no-store-check",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    kinds = [k for k, _ in fake.created()]
    assert kinds == ["ConfigMap", "WorkflowTemplate", "Workflow"]
    workflow = next(o for (k, _, _), o in fake.objects.items() if k == "Workflow")
    assert workflow["spec"] == {"workflowTemplateRef": {"name": "cmv-pipeline-wf-4"}}
    assert f"Workflow {workflow['metadata']['name']} created from WorkflowTemplate cmv-pipeline-wf-4" in out
    assert not fake.created("Job") and not fake.created("JobSet")  # nothing runs from here
    # Again, with another recipe: the template is replaced (a PUT), a second Workflow created.
    assert cli.main([*args, "--recipe", "configs/llama-3.2-3b.yaml"]) == 0
    assert "WorkflowTemplate cmv-pipeline-wf-4 replaced" in capsys.readouterr().out
    template = fake.objects[("WorkflowTemplate", "cmv-test", "cmv-pipeline-wf-4")]
    assert template["metadata"]["resourceVersion"] == "2"
    config = next(
        o
        for (k, _, _), o in fake.objects.items()
        if k == "ConfigMap" and o["data"]["CMV_RECIPE"] == "configs/llama-3.2-3b.yaml"
    )
    assert templates(template)["clean"]["container"]["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert [k for k, _ in fake.created()].count("Workflow") == 2


# ---------------------------------------------------------------- the steps, executed


@pytest.mark.slow
def test_argo_steps_run_in_dag_order_as_local_processes_and_produce_the_report(s3_bucket, tiny_model_dir, tmp_path):
    from test_k8s_local import TEST_SECRETS, expand, explain, free_port, pod_process, tiny_settings

    run_id = f"a-{uuid.uuid4().hex[:6]}"
    root = f"{s3_bucket}/runs"
    settings = tiny_settings(
        root, run_id, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], NNODES="1", MASTER_PORT=str(free_port())
    )
    run = k8s_render.plan(k8s_render.render_objects("jobset", settings=settings, tag=TAG))
    wt = k8s_argo.workflow_template(run)
    by_name = templates(wt)
    for name in k8s_argo.dag_order(wt):
        t = by_name[name]
        if "resource" in t:  # the JobSet this step creates: its one pod (NNODES=1), as the JobSet would run it
            jobset = yaml.safe_load(t["resource"]["manifest"])
            pod = k8s_names.pod_template(jobset)
            job = {
                "kind": "Job",
                "metadata": {"name": f"{jobset['metadata']['name']}-node-0"},
                "spec": {
                    "completionMode": "Indexed",
                    "template": {
                        "metadata": {
                            "labels": {
                                **pod["metadata"]["labels"],
                                "jobset.sigs.k8s.io/jobset-name": jobset["metadata"]["name"],
                            }
                        },
                        "spec": pod["spec"],
                    },
                },
            }
            argv, env = pod_process(job, run.config, TEST_SECRETS, index=0)
            assert env["MASTER_ADDR"] == f"{jobset['metadata']['name']}-node-0-0.{jobset['metadata']['name']}"
            env["MASTER_ADDR"] = "127.0.0.1"
            argv = [expand(a, env) if not a.startswith("--master-addr") else "--master-addr=127.0.0.1" for a in argv]
        else:  # a container step: the template's container and pod settings, as Argo's pod would have them
            job = {
                "kind": "Job",
                "metadata": {"name": f"{wt['metadata']['name']}-{name}"},
                "spec": {"template": {"metadata": t["metadata"], "spec": {"containers": [t["container"]]}}},
            }
            argv, env = pod_process(job, run.config, TEST_SECRETS)
        env["TMPDIR"] = str(tmp_path / name)
        os.makedirs(env["TMPDIR"])
        proc = subprocess.run(
            argv, env=env, cwd=k8s_names.default_k8s_dir().parent, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{name}: {explain(proc)}"
        assert storage.exists(f"{root}/{run_id}/{name}/_SUCCESS"), name
    assert storage.read_text(f"{root}/{run_id}/judge/report.md").strip()
