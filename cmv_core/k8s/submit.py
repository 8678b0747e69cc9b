"""``cmv k8s submit`` and ``status``: the run's stages as Kubernetes Jobs, in order, from here.

``submit`` (the ``kubernetes`` Python client) creates the pipeline ConfigMap,
then each stage's objects in pipeline order (a Job, or the jobset overlay's train
JobSet), waits for it, streams its pods' logs (reconnecting from ``sinceTime``),
and on failure stops and reports the stage and the last lines of its failed
pods' logs. Every call is retried on 429/5xx and connection errors (urllib3's
Retry). Every workload carries a settings hash; a stage is skipped only when its
``_SUCCESS`` is the output of this run's settings and of its upstream outputs as
they are now (or, when the store cannot be reached from here, when its Job
completed with the same hash), so submitting a run again resumes it from its
first stage to redo; a finished Job of that stage is deleted first, in the
foreground (Job specs are immutable), and a live one with another hash is an
error. ``--engine argo`` instead creates one Argo WorkflowTemplate (argo.py).

With the dpo stage (``--dpo``), its ``_SUCCESS`` is compared with the recipe's ``dpo:`` section read over
``train:``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cmv_core.k8s import argo
from cmv_core.k8s.api import (
    Cluster,
    check_same_settings,
    create_object,
    delete_job,
    is_status,
    job_failure,
    job_pods,
    job_state,
    owned_by,
    read_job,
)
from cmv_core.k8s.names import WORKLOAD_KINDS, K8sError
from cmv_core.k8s.render import Plan
from cmv_core.k8s.watch import LogStreamer, StageStatus, stage_status, tail_logs, wait_for_job

log = logging.getLogger(__name__)


def status(cluster: Cluster, run: Plan, check_store: bool = True) -> list[StageStatus]:
    """Each stage's state; a stage is not done when a stage it reads is not, as submit would run it again after."""
    out = []
    store_ok = check_store
    redo: set[str] = set()
    for stage in run.order:
        st = stage_status(cluster, run, stage, store_ok)
        if st.success is None:
            store_ok = False  # unreachable once: do not wait on it for every stage
        # Its _SUCCESS matches its inputs as they are now, but submit remakes an input first, and then it.
        upstream_redo = [u for u in run.upstream(stage) if u in redo]
        if st.done and upstream_redo:
            st.stale = f"its input stage {', '.join(upstream_redo)} runs again first"
        if not st.done:
            redo.add(stage)
        out.append(st)
    return out


def submit(
    cluster: Cluster,
    run: Plan,
    *,
    stages: list[str] | None = None,
    check_store: bool = True,
    poll_s: float = 5,
    stage_timeout_s: float = 0,
    tail: int = 40,
    out: Callable[[str], None] = print,
) -> int:
    """Run the stages of ``run`` in order as Jobs; 0 when all finished, 1 (with a report) when one failed.

    A stage is skipped only when its ``_SUCCESS`` is the output of this run's settings and of its upstream
    outputs as they are now (:func:`manifest_mismatch`); a running Job is adopted only when its settings
    hash is this submit's (else :class:`SettingsConflict`).
    """
    stages = stages or run.order
    missing = [s for s in stages if s not in run.stages]
    if missing:
        raise K8sError(f"--stages {' '.join(missing)}: not a stage of this run (dpo: render it with --dpo)")
    for obj in run.other:
        log.info(
            "not created by submit: %s/%s (apply its kustomization once, e.g. k8s/overlays/dev/minio)",
            obj["kind"],
            obj["metadata"]["name"],
        )
    create_object(cluster, run.config)
    store_ok = check_store
    for stage in stages:
        name, kind = run.job(stage)["metadata"]["name"], run.job(stage)["kind"]
        # Skip what is done: its _SUCCESS matches (or, store unreachable, its Job completed with our settings).
        st = stage_status(cluster, run, stage, store_ok)
        if st.success is None and store_ok:
            store_ok = False
        if st.done:
            why = "_SUCCESS matches" if st.success else "Job completed"
            out(f"=== {stage}: done ({why}), skipped")
            continue
        _start_stage(cluster, run, stage, st, poll_s, out)
        streamer = LogStreamer(cluster, out, retry_s=min(poll_s, 1))
        job = wait_for_job(cluster, name, poll_s=poll_s, timeout_s=stage_timeout_s, streamer=streamer, kind=kind)
        if job_state(job) == "failed":
            out(failure_report(cluster, stage, name, job, tail, kind))
            return 1
        out(f"=== {stage}: {kind} {name} succeeded")
    settings = run.settings
    if "judge" in stages:
        out(f"report: {run.stage_uri('judge')}/report.md")
    else:
        out(f"artifacts under {settings.get('ARTIFACT_ROOT', '?')}/{run.run_id}/")
    return 0


def _start_stage(
    cluster: Cluster, run: Plan, stage: str, st: StageStatus, poll_s: float, out: Callable[[str], None]
) -> None:
    """Create the stage's objects, after deleting a finished Job of it; or adopt its live Job of our settings."""
    name, kind = run.job(stage)["metadata"]["name"], run.job(stage)["kind"]
    if st.stale:
        out(f"=== {stage}: {'_SUCCESS present but ' if st.success else ''}{st.stale}; running it again")
    if st.state in ("pending", "running") and not st.same_settings:
        check_same_settings(read_job(cluster, name, kind), run.job(stage))
    if st.state in ("succeeded", "failed"):
        # A finished Job whose output is not there (or not ours): the name is taken, Job specs are immutable.
        out(f"=== {stage}: {kind} {name} {st.state} earlier; deleting it (and waiting for its pods) to run again")
        delete_job(cluster, name, poll_s=min(poll_s, 1), kind=kind)
        st.state = "absent"
    if st.state == "absent":
        for obj in run.stages[stage]:
            created = create_object(cluster, obj)
            if obj["kind"] in WORKLOAD_KINDS and created is not True and created:
                owned_by(cluster, [run.config, *run.stages[stage]], created)
        out(f"=== {stage}: {kind} {name} created")
    else:
        out(f"=== {stage}: {kind} {name} already {st.state}, waiting for it")


def failure_report(cluster: Cluster, stage: str, name: str, job: Any, tail: int, kind: str = "Job") -> str:
    lines = [f"stage {stage} FAILED: {kind} {name}: {job_failure(job)}"]
    pods = job_pods(cluster, name, kind)
    # The last few failed pods (a multi-node Job fails on several at once), else the newest pod.
    failed = [p for p in pods if p.status.phase == "Failed"][-3:] or pods[-1:]
    for pod in failed:
        lines.append(f"--- last {tail} log lines of pod {pod.metadata.name} ({pod.status.phase}):")
        lines.append(tail_logs(cluster, pod.metadata.name, tail).rstrip("\n"))
    lines.append(
        f"later stages were not started; fix the cause, then submit the same run id again to resume from {stage}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- argo engine


ARGO_HAS_NO_DPO = (
    "--engine argo has no dpo step (its WorkflowTemplate runs the five stages): run DPO with "
    "--engine jobs and --overlay multinode (or gpu)"
)


def argo_template(run: Plan) -> dict:
    if run.job("train")["kind"] != "JobSet":
        raise K8sError("--engine argo runs the train stage as a JobSet: use --overlay jobset")
    if "dpo" in run.stages:
        raise K8sError(ARGO_HAS_NO_DPO)
    return argo.workflow_template(run)


def submit_argo(cluster: Cluster, run: Plan, out: Callable[[str], None] = print) -> int:
    """Create the run's ConfigMap and WorkflowTemplate (replaced when it exists), and one Workflow from it.

    Nothing to keep alive here: the DAG runs in the cluster. A template of this run with other settings is
    replaced only while no Workflow of it is running, which Argo itself does not check: say so.
    """
    from kubernetes.client.exceptions import ApiException

    template = argo_template(run)
    create_object(cluster, run.config)
    group, version = argo.ARGO_API
    name = template["metadata"]["name"]
    try:
        cluster.custom.create_namespaced_custom_object(group, version, cluster.namespace, "workflowtemplates", template)
    except ApiException as exc:
        if not is_status(exc, 409):
            raise
        current = cluster.custom.get_namespaced_custom_object(
            group, version, cluster.namespace, "workflowtemplates", name
        )
        template["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        cluster.custom.replace_namespaced_custom_object(
            group, version, cluster.namespace, "workflowtemplates", name, template
        )
        out(f"WorkflowTemplate {name} replaced with this submit's settings")
    created = cluster.custom.create_namespaced_custom_object(
        group, version, cluster.namespace, "workflows", argo.workflow(template)
    )
    workflow_name = created["metadata"]["name"]
    out(f"Workflow {workflow_name} created from WorkflowTemplate {name}: the pipeline runs in the cluster")
    out(f"follow it: argo watch -n {cluster.namespace} {workflow_name}   (or argo logs -f ...)")
    out(f"report, when it has finished: {run.stage_uri('judge')}/report.md")
    return 0
