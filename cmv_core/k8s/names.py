"""What the Kubernetes side calls things: stages, overlays, labels, Job names, the run id, the error type.

The manifests live in ``k8s/`` (kustomize): ``base/`` has one Job per stage and
the pipeline ConfigMap; ``overlays/<name>/`` (dev, gpu, multinode, jobset) set the
environment, each as a whole pipeline and as one kustomization per stage
(``overlays/<name>/<stage>``), so that ``kubectl apply -k`` of one stage works
by itself. Every value is set in one place, ``overlays/<name>/settings/
pipeline.env``; the run id (``RUN_ID``) names the Jobs (``cmv-<stage>-<run
id>``) and the train size (``NNODES``) sets the Indexed Job's completions and
parallelism, both through the ``base/derive`` component.
"""

from __future__ import annotations

import re
from pathlib import Path

from cmv_core import stages as graph

STAGES = list(graph.COMMANDS)  # every run's stages, one image each
# dpo: optional, a second train Job (image cmv-train) after SFT, in a run rendered with the dpo component
# (k8s/components/dpo, `--dpo`); generate then reads its output too. As `cmv run` orders them.
OPTIONAL_STAGES = list(graph.OPT_IN)
PIPELINE = [s.name for s in graph.PIPELINE]
OVERLAYS = ["dev", "gpu", "multinode", "jobset"]
IMAGES = [f"cmv-{s}" for s in STAGES]
DPO_COMPONENT = "components/dpo"
STAGE_LABEL = "cmv.io/stage"
RUN_LABEL = "cmv.io/run-id"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# What a stage Job runs (image, arguments, its recipe section): label (a prefix) to select by, annotation in full.
SETTINGS_LABEL = "cmv.io/settings-hash"
SETTINGS_ANNOTATION = "cmv.io/settings-sha256"
# The stage outputs each stage reads (what its _SUCCESS records as inputs, besides RAW_INPUT for clean).
UPSTREAM = {s.name: list(s.reads) for s in graph.PIPELINE}
upstream = graph.upstream


# Pod hostnames of the Indexed train Job are cmv-train-<run id>-<index>: a DNS label of at most 63 characters.
RUN_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
ENV_LINE_RE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


WORKLOAD_KINDS = ("Job", "JobSet")
JOBSET_API = ("jobset.x-k8s.io", "v1alpha2")
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"


class K8sError(RuntimeError):
    """A problem with the manifests, the settings or the cluster, with a message for the user."""


class SettingsConflict(K8sError):
    pass


def pod_template(workload: dict) -> dict:
    """The pod template of a Job, or of a JobSet's (one) replicated Job."""
    if workload["kind"] == "JobSet":
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    return workload["spec"]["template"]


def gang_size(workload: dict) -> int:
    spec = (
        workload["spec"]["replicatedJobs"][0]["template"]["spec"] if workload["kind"] == "JobSet" else workload["spec"]
    )
    return int(spec.get("completions") or 1)


def default_k8s_dir() -> Path:
    """The repository's ``k8s/`` next to the package (editable install), else ``./k8s``."""
    here = Path(__file__).resolve().parents[2] / "k8s"
    return here if (here / "base").is_dir() else Path("k8s")


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id or ""):
        raise K8sError(
            f"run id {run_id!r} must be lowercase letters, digits and '-', start and end with a letter or digit, "
            "at most 40 characters (it becomes part of Job and pod names)"
        )
    return run_id


def job_name(stage: str, run_id: str) -> str:
    return f"cmv-{stage}-{run_id}"
