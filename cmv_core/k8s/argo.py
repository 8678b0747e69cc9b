"""The pipeline as one Argo Workflows ``WorkflowTemplate``: the five stages as a DAG that runs in the cluster
(no laptop loop to keep alive), built from the same rendered manifests as the plain Jobs.

Each container stage is an Argo container template carrying the Job's pod exactly (container, volumes,
security context, tolerations, affinity), so the stages run the same command, arguments and environment
(tests/test_k8s_argo.py compares them). The train stage is a resource template that creates the jobset
overlay's JobSet (owned by the workflow, so it goes with it) and waits until it completes or fails; the gang
restarts on a drain are the JobSet's. Retries follow the Jobs' policies: exit 2 (bad recipe or input) is never
retried. ``cmv k8s render|submit --engine argo``; the plain Jobs stay the default and need no Argo install.

The workflow's pods run as ``ARGO_SERVICE_ACCOUNT`` (pipeline.env, default ``cmv-workflow``), which needs
RBAC to create, get and watch JobSets in the namespace (k8s/overlays/argo/rbac.yaml).
"""

from __future__ import annotations

import copy
from typing import Any

from cmv_core.k8s.names import RUN_LABEL, STAGES

ARGO_API = ("argoproj.io", "v1alpha1")
# What the Job-level settings become in Argo: the DAG's deadline bounds the whole run.
RUN_DEADLINE_S = 5 * 86400
TTL_S = 7 * 86400


def _container_template(stage: str, job: dict) -> dict:
    pod = copy.deepcopy(job["spec"]["template"])
    spec = pod["spec"]
    out: dict[str, Any] = {
        "name": stage,
        "metadata": {"labels": pod["metadata"].get("labels", {})},
        "container": next(c for c in spec["containers"] if c["name"] == "main"),
        "activeDeadlineSeconds": job["spec"]["activeDeadlineSeconds"],
        # Like the Job's backoffLimit and podFailurePolicy: retry crashes and lost nodes, never an exit 2.
        "retryStrategy": {
            "limit": str(job["spec"].get("backoffLimit", 2)),
            "retryPolicy": "Always",
            "expression": "lastRetry.exitCode != '2'",
            "backoff": {"duration": "30s", "factor": "2", "maxDuration": "1h"},
        },
    }
    for key in ("volumes", "securityContext", "tolerations", "affinity", "automountServiceAccountToken"):
        if key in spec:
            out[key] = spec[key]
    if "terminationGracePeriodSeconds" in spec:
        out["podSpecPatch"] = f'{{"terminationGracePeriodSeconds": {spec["terminationGracePeriodSeconds"]}}}'
    return out


def _resource_template(stage: str, workload: dict) -> dict:
    import yaml

    manifest = copy.deepcopy(workload)
    return {
        "name": stage,
        "activeDeadlineSeconds": workload["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"],
        # Only API errors while creating or watching: the JobSet restarts its own gang (failurePolicy).
        "retryStrategy": {
            "limit": "3",
            "retryPolicy": "OnError",
            "backoff": {"duration": "30s", "factor": "2", "maxDuration": "10m"},
        },
        "resource": {
            "action": "create",
            "setOwnerReference": True,
            "successCondition": "status.terminalState == Completed",
            "failureCondition": "status.terminalState == Failed",
            "manifest": yaml.safe_dump(manifest, sort_keys=False),
        },
    }


def workflow_template(run: Any, service_account: str | None = None) -> dict:
    """The WorkflowTemplate of a rendered run (a :class:`cmv_core.k8s.render.Plan` of the jobset overlay)."""
    tasks, templates, previous = [], [], None
    for stage in STAGES:
        workload = run.job(stage)
        if workload["kind"] == "JobSet":
            templates.append(_resource_template(stage, workload))
        else:
            templates.append(_container_template(stage, workload))
        tasks.append({"name": stage, "template": stage, **({"dependencies": [previous]} if previous else {})})
        previous = stage
    labels = {"app.kubernetes.io/name": "cmv-persuasion", RUN_LABEL: run.run_id}
    return {
        "apiVersion": "/".join(ARGO_API),
        "kind": "WorkflowTemplate",
        "metadata": {"name": f"cmv-pipeline-{run.run_id}", "labels": labels},
        "spec": {
            "entrypoint": "pipeline",
            "serviceAccountName": service_account or run.settings.get("ARGO_SERVICE_ACCOUNT") or "cmv-workflow",
            "activeDeadlineSeconds": RUN_DEADLINE_S,
            "ttlStrategy": {"secondsAfterSuccess": TTL_S, "secondsAfterFailure": TTL_S},
            # Succeeded pods go at once; a failed stage's pod stays for its logs until the TTL.
            "podGC": {"strategy": "OnPodSuccess"},
            "workflowMetadata": {"labels": labels},
            "podMetadata": {"labels": labels},
            "templates": [{"name": "pipeline", "dag": {"tasks": tasks}}, *templates],
        },
    }


def workflow(template: dict) -> dict:
    """A Workflow that runs ``template`` (what ``cmv k8s submit --engine argo`` creates)."""
    return {
        "apiVersion": "/".join(ARGO_API),
        "kind": "Workflow",
        "metadata": {
            "generateName": f"{template['metadata']['name']}-",
            "labels": dict(template["metadata"]["labels"]),
        },
        "spec": {"workflowTemplateRef": {"name": template["metadata"]["name"]}},
    }


def dag_order(template: dict) -> list[str]:
    """The DAG's tasks in an order that respects every dependency (their templates' names)."""
    dag = next(t for t in template["spec"]["templates"] if t["name"] == template["spec"]["entrypoint"])["dag"]
    tasks = {t["name"]: t for t in dag["tasks"]}
    done: list[str] = []
    while len(done) < len(tasks):
        ready = [n for n, t in tasks.items() if n not in done and set(t.get("dependencies", [])) <= set(done)]
        if not ready:
            raise ValueError(f"the DAG has a cycle among {sorted(set(tasks) - set(done))}")
        done.append(ready[0])
    return [tasks[n]["template"] for n in done]
