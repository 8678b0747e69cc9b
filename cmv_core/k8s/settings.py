"""A run's settings: the ``pipeline.env`` values from the command line, and each stage workload's settings hash.

The hash covers what decides a stage's output (image, command, arguments, gang size, the recipe's part for the
stage); submit compares it with the hash of an existing Job before adopting it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmv_core.k8s.names import (
    PIPELINE,
    SETTINGS_ANNOTATION,
    SETTINGS_LABEL,
    STAGE_LABEL,
    K8sError,
    default_k8s_dir,
    gang_size,
    pod_template,
)

log = logging.getLogger(__name__)


def run_settings(
    run_id: str | None = None,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    recipe: str | None = None,
    model: str | None = None,
    artifact_root: str | None = None,
    raw_input: str | None = None,
    extra: Iterable[str] = (),
) -> dict[str, str]:
    """The pipeline.env values for one run, from the command-line options."""
    out: dict[str, str] = {}
    for key, value in (
        ("RUN_ID", run_id),
        ("NNODES", nodes),
        ("NPROC_PER_NODE", gpus_per_node),
        ("CMV_RECIPE", recipe),
        ("CMV_MODEL", model),
        ("ARTIFACT_ROOT", artifact_root),
        ("RAW_INPUT", raw_input),
    ):
        if value is not None:
            out[key] = str(value)
    for item in extra:
        if "=" not in item:
            raise K8sError(f"--setting {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    if "NNODES" in out and not (out["NNODES"].isdigit() and int(out["NNODES"]) >= 1):
        raise K8sError(f"NNODES must be a whole number >= 1, got {out['NNODES']!r}")
    if "NPROC_PER_NODE" in out:
        if not (out["NPROC_PER_NODE"].isdigit() and int(out["NPROC_PER_NODE"]) >= 1):
            raise K8sError(f"NPROC_PER_NODE must be a whole number >= 1, got {out['NPROC_PER_NODE']!r}")
        for key, value in train_pod_size(int(out["NPROC_PER_NODE"])).items():
            out.setdefault(key, value)  # an explicit --setting TRAIN_CPU=... wins
    return out


# Per GPU of a train pod: CPUs (data loading, NCCL proxies), memory, and /dev/shm (NCCL, DataLoader workers).
TRAIN_PER_GPU = {
    "TRAIN_CPU": (8, ""),
    "TRAIN_MEMORY": (64, "Gi"),
    "TRAIN_MEMORY_LIMIT": (96, "Gi"),
    "TRAIN_SHM": (32, "Gi"),
}


def train_pod_size(gpus: int) -> dict[str, str]:
    """The train pod's CPU, memory and /dev/shm for ``gpus`` GPUs (pipeline.env keys, base/gpus-per-node)."""
    return {key: f"{per * gpus}{unit}" for key, (per, unit) in TRAIN_PER_GPU.items()}


# ---------------------------------------------------------------- settings hash


def expand_vars(text: str, values: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of command and args (``$$`` is a literal ``$``)."""
    return re.sub(
        r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else values.get(m.group(1), m.group(0)), text
    )


def load_recipe_here(recipe: str | None) -> dict | None:
    """The recipe as this machine can read it (a path as given or in the repository, an s3:// URI), else None.

    Only to compare settings: the stages themselves read the recipe inside their image.
    """
    import yaml

    if not recipe:
        return None
    try:
        if "://" in recipe:
            from cmv_core import storage

            text = storage.read_text(recipe)
        else:
            path = next((p for p in (Path(recipe), default_k8s_dir().parent / recipe) if p.is_file()), None)
            if path is None:
                return None
            text = path.read_text()
        doc = yaml.safe_load(text)
        return doc if isinstance(doc, dict) else None
    except Exception as exc:
        log.warning(
            "cannot read the recipe %s from here (%s: %s); comparing its path only", recipe, type(exc).__name__, exc
        )
        return None


def json_safe(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def stage_settings(job: dict, values: dict[str, str], recipe: dict | None) -> dict:
    """What decides a stage Job's output: its image, command, arguments (ConfigMap values expanded), the size
    of the train gang, and the recipe's part for this stage (its own section and the top-level keys).

    Not in it: how long to wait for inputs, and the recipe's path (its content counts, when readable here).
    """
    stage = job["metadata"]["labels"][STAGE_LABEL]
    container = next(c for c in pod_template(job)["spec"]["containers"] if c["name"] == "main")
    args = [expand_vars(a, values) for a in container.get("args") or []]
    ignored = ("--wait-for-input=",) + (("--config=",) if recipe is not None else ())
    # dpo reads its dpo: section over train: (cmv_core.stages.dpo_over_train); no other stage reads dpo:.
    own = {stage, "train"} if stage == "dpo" else {stage}
    part = None if recipe is None else {k: v for k, v in recipe.items() if k not in PIPELINE or k in own}
    return json_safe(
        {
            "stage": stage,
            "image": container.get("image"),
            "command": [expand_vars(a, values) for a in container.get("command") or []],
            "args": [a for a in args if not a.startswith(ignored)],
            "nodes": gang_size(job),
            "recipe": part,
        }
    )


def settings_hash(settings: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def stamp_settings(job: dict, values: dict[str, str], recipe: dict | None) -> str:
    """Label and annotate ``job`` (and its pods) with its settings hash; return the hash."""
    digest = settings_hash(stage_settings(job, values, recipe))
    for meta in (job["metadata"], pod_template(job).setdefault("metadata", {})):
        meta.setdefault("labels", {})[SETTINGS_LABEL] = digest[:16]
    job["metadata"].setdefault("annotations", {})[SETTINGS_ANNOTATION] = digest
    return digest


def job_settings_hash(job: Any) -> str | None:
    """The settings hash of a Job read from the API (a kubernetes client object or a dict)."""
    meta = job.metadata if hasattr(job, "metadata") else job["metadata"]
    annotations = (meta.annotations if hasattr(meta, "annotations") else meta.get("annotations")) or {}
    return annotations.get(SETTINGS_ANNOTATION)


def check_dpo_run(workloads: dict[str, dict], recipe: dict | None, recipe_name: str | None) -> None:
    """A run with the dpo stage (``workloads``: stage -> workload) trains on Indexed Jobs, and its recipe (when
    readable here) runs DPO; else a :class:`K8sError` saying what to change."""
    if "dpo" not in workloads:
        return
    if any(w["kind"] != "Job" for s, w in workloads.items() if s in ("train", "dpo")):
        raise K8sError(
            "the dpo component (--dpo) adds DPO as an Indexed Job like the dev, gpu and multinode "
            "overlays' train Job; the jobset overlay trains on a JobSet (and --engine argo needs it), "
            "so it has no DPO stage: use --overlay multinode (or gpu) with --dpo"
        )
    if recipe is not None:
        from cmv_core.stages import dpo_enabled

        if not dpo_enabled(recipe):
            raise K8sError(
                f"--dpo (the dpo component): the recipe {recipe_name} has no dpo: section, or its "
                "dpo.enabled is false; add the section or drop --dpo"
            )
