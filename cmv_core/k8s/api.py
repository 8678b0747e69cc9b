"""The Kubernetes API: the cluster's clients, and creating, reading and deleting a stage's Job (or JobSet).

Every call is retried on 429/5xx and connection errors (urllib3's Retry, :func:`api_retries`). The
``kubernetes`` client is imported inside functions: the clean image has none.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmv_core.k8s.names import (
    JOB_NAME_LABEL,
    JOBSET_API,
    JOBSET_NAME_LABEL,
    WORKLOAD_KINDS,
    K8sError,
    SettingsConflict,
)
from cmv_core.k8s.settings import job_settings_hash

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    core: Any  # kubernetes.client.CoreV1Api
    batch: Any  # kubernetes.client.BatchV1Api
    namespace: str
    custom: Any = None  # kubernetes.client.CustomObjectsApi (JobSet, Argo WorkflowTemplate)


def api_retries() -> Any:
    """urllib3's Retry for every API call: 429 and 5xx answers and connection errors, exponential backoff.

    POST is retried too: a create that reached the server before the connection broke answers 409 on the
    retry, and :func:`create_object` adopts the object when its settings hash is ours.
    ``CMV_K8S_RETRIES`` / ``CMV_K8S_BACKOFF_S`` tune it (the backoff doubles, capped at 30 s).
    """
    from urllib3.util.retry import Retry

    return Retry(
        total=int(os.environ.get("CMV_K8S_RETRIES", "8")),
        backoff_factor=float(os.environ.get("CMV_K8S_BACKOFF_S", "0.5")),
        backoff_max=30,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,  # every verb
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer reaches the client, which raises ApiException with it
    )


def connect(namespace: str | None = None, context: str | None = None) -> Cluster:
    """API clients from the kubeconfig (``$KUBECONFIG``), or the pod's service account inside a cluster."""
    from kubernetes import client, config

    # $KUBECONFIG read now: the client reads it once, when first imported.
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        if namespace is None:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            namespace = (active or {}).get("context", {}).get("namespace")
    except (config.ConfigException, OSError) as exc:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise K8sError(f"no cluster to talk to: kubeconfig {kubeconfig}: {exc}; and not inside a pod") from None
    configuration.retries = api_retries()
    api = client.ApiClient(configuration)
    return Cluster(client.CoreV1Api(api), client.BatchV1Api(api), namespace or "default", client.CustomObjectsApi(api))


def is_status(exc: BaseException, code: int) -> bool:
    return getattr(exc, "status", None) == code


def api_error_line(exc: BaseException) -> str:
    """An ApiException (or a connection error after the retries) as one line: status, reason, the server's message."""
    import json

    status = getattr(exc, "status", None)
    if status is None:
        return f"cannot reach the API server: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    message = ""
    try:
        message = json.loads(getattr(exc, "body", "") or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = str(getattr(exc, "body", "") or "")[:200]
    return f"API server answered {status} {getattr(exc, 'reason', '') or ''}: {message}".strip().replace("\n", " ")


def create_object(cluster: Cluster, obj: dict) -> bool:
    """Create one object; False when it exists already with the same settings (names carry the run id).

    A Job of that name with another settings hash is a :class:`SettingsConflict` naming both: two submits
    of one run id with different settings must not share the first one's Job.
    """
    from kubernetes.client.exceptions import ApiException

    kind, ns = obj["kind"], cluster.namespace
    create: dict[str, Callable] = {
        "ConfigMap": cluster.core.create_namespaced_config_map,
        "Service": cluster.core.create_namespaced_service,
        "Job": cluster.batch.create_namespaced_job,
        "JobSet": lambda ns_, body: cluster.custom.create_namespaced_custom_object(*JOBSET_API, ns_, "jobsets", body),
    }
    if kind not in create:
        raise K8sError(f"submit does not create {kind} objects; apply them with kubectl apply -k")
    try:
        created = create[kind](ns, obj)
        log.info("created %s/%s", kind, obj["metadata"]["name"])
        return created or True
    except ApiException as exc:
        if not is_status(exc, 409):
            raise
    if kind in WORKLOAD_KINDS:
        check_same_settings(read_job(cluster, obj["metadata"]["name"], kind), obj)
    return False


def owned_by(cluster: Cluster, objects: list[dict], workload: Any) -> None:
    """Make the stage's workload the owner of its Service and of the run's ConfigMap, so that the garbage
    collector deletes them with the last Job that uses them (ttlSecondsAfterFinished, or a delete)."""
    meta = workload.get("metadata") if isinstance(workload, dict) else getattr(workload, "metadata", None)
    uid = meta.get("uid") if isinstance(meta, dict) else getattr(meta, "uid", None)
    name = meta.get("name") if isinstance(meta, dict) else getattr(meta, "name", None)
    if not uid:
        return
    kind = "JobSet" if isinstance(workload, dict) and workload.get("kind") == "JobSet" else "Job"
    ref = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2" if kind == "JobSet" else "batch/v1",
        "kind": kind,
        "name": name,
        "uid": uid,
        "blockOwnerDeletion": False,
    }
    patch = {"metadata": {"ownerReferences": [ref]}}  # strategic merge: added to the list, keyed by uid
    for obj in objects:
        if obj["kind"] == "Service":
            cluster.core.patch_namespaced_service(obj["metadata"]["name"], cluster.namespace, patch)
        elif obj["kind"] == "ConfigMap":
            cluster.core.patch_namespaced_config_map(obj["metadata"]["name"], cluster.namespace, patch)


def check_same_settings(existing: Any | None, job: dict) -> None:
    ours = job_settings_hash(job)
    theirs = job_settings_hash(existing) if existing is not None else ours
    if theirs != ours:
        name = job["metadata"]["name"]
        raise SettingsConflict(
            f"Job {name} exists with other settings (settings hash {str(theirs)[:16] if theirs else 'none'}, this "
            f"submit's is {str(ours)[:16]}): another submit of this run id, or one by hand. Use another run id, or "
            f"delete it (kubectl delete job {name} --cascade=foreground) to run these settings"
        )


def _jobset_as_job(obj: dict) -> Any:
    """A JobSet read from the API in the shape :func:`job_state` and the status table read (a Job's)."""
    from types import SimpleNamespace as NS

    status = obj.get("status") or {}
    jobs = status.get("replicatedJobsStatus") or []
    conditions = [
        NS(
            type={"Completed": "Complete"}.get(c.get("type"), c.get("type")),
            status=c.get("status"),
            reason=c.get("reason"),
            message=c.get("message"),
        )
        for c in status.get("conditions") or []
    ]
    meta = obj.get("metadata") or {}
    return NS(
        metadata=NS(name=meta.get("name"), annotations=meta.get("annotations") or {}),
        status=NS(
            conditions=conditions,
            active=sum(j.get("active", 0) for j in jobs),
            ready=sum(j.get("ready", 0) for j in jobs),
            succeeded=sum(j.get("succeeded", 0) for j in jobs),
            failed=sum(j.get("failed", 0) for j in jobs),
            restarts=status.get("restarts", 0),
        ),
    )


def read_job(cluster: Cluster, name: str, kind: str = "Job") -> Any | None:
    from kubernetes.client.exceptions import ApiException

    try:
        if kind == "JobSet":
            return _jobset_as_job(
                cluster.custom.get_namespaced_custom_object(*JOBSET_API, cluster.namespace, "jobsets", name)
            )
        return cluster.batch.read_namespaced_job(name, cluster.namespace)
    except ApiException as exc:
        if is_status(exc, 404):
            return None
        raise


def job_state(job: Any | None) -> str:
    """absent, pending, running, succeeded or failed, from the Job's conditions and counts."""
    if job is None:
        return "absent"
    status = job.status
    for cond in status.conditions or []:
        if cond.status == "True" and cond.type in ("Complete", "SuccessCriteriaMet"):
            return "succeeded"
        if cond.status == "True" and cond.type in ("Failed", "FailureTarget"):
            return "failed"
    if status.active or status.ready:
        return "running"
    return "pending"


def job_failure(job: Any) -> str:
    for cond in job.status.conditions or []:
        if cond.status == "True" and cond.type in ("Failed", "FailureTarget"):
            return f"{cond.reason or 'Failed'}: {cond.message or ''}".strip().rstrip(":")
    return "failed"


def job_pods(cluster: Cluster, name: str, kind: str = "Job") -> list[Any]:
    label = JOBSET_NAME_LABEL if kind == "JobSet" else JOB_NAME_LABEL
    pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=f"{label}={name}").items
    return sorted(pods, key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))


def delete_job(cluster: Cluster, name: str, timeout_s: float = 300, poll_s: float = 1, kind: str = "Job") -> None:
    """Delete a Job with Foreground propagation, and wait until its pods are gone and the name is free.

    Background deletion frees the name at once: a new train pod could then start beside a dying one with
    the same hostname, and the headless Service would still publish the dying pod as MASTER_ADDR.
    """
    from kubernetes.client import V1DeleteOptions
    from kubernetes.client.exceptions import ApiException

    try:
        if kind == "JobSet":
            cluster.custom.delete_namespaced_custom_object(
                *JOBSET_API, cluster.namespace, "jobsets", name, body=V1DeleteOptions(propagation_policy="Foreground")
            )
        else:
            cluster.batch.delete_namespaced_job(
                name, cluster.namespace, body=V1DeleteOptions(propagation_policy="Foreground")
            )
    except ApiException as exc:
        if not is_status(exc, 404):
            raise
    deadline = time.monotonic() + timeout_s
    while read_job(cluster, name, kind) is not None or job_pods(cluster, name, kind):
        if time.monotonic() > deadline:
            raise K8sError(f"Job {name} and its pods were not gone within {timeout_s:.0f} s of deleting it")
        time.sleep(poll_s)
