"""``cmv k8s``: the pipeline as Kubernetes Jobs (render, submit, status).

The manifests live in ``k8s/`` (kustomize): ``base/`` has one Job per stage and
the pipeline ConfigMap; ``overlays/<name>/`` (dev, gpu, multinode, jobset) set the
environment, each as a whole pipeline and as one kustomization per stage
(``overlays/<name>/<stage>``), so that ``kubectl apply -k`` of one stage works
by itself. Every value is set in one place, ``overlays/<name>/settings/
pipeline.env``; the run id (``RUN_ID``) names the Jobs (``cmv-<stage>-<run
id>``) and the train size (``NNODES``) sets the Indexed Job's completions and
parallelism, both through the ``base/derive`` component.

``render`` copies ``k8s/`` to a temporary folder, writes the run's settings
into that copy's ``pipeline.env`` files (and the image registry/tag into its
``images:``), and runs ``kubectl kustomize``: the output is exactly what a user
gets by editing those files and running ``kubectl kustomize`` themselves.

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
error. ``--engine argo`` instead creates one Argo WorkflowTemplate (k8s_argo).

``--dpo`` adds the optional dpo stage (the ``components/dpo`` component, listed first in the copy's overlay):
a second train Job between train and generate (``cmv train --method dpo``, image cmv-train), handled like
train; its ``_SUCCESS`` is compared with the recipe's ``dpo:`` section read over ``train:``, and generate
reads its output. Not with the jobset overlay or the Argo engine (a one-line error).

Heavy imports (``kubernetes``, ``yaml``) happen inside functions: the clean
image has neither.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmv_core import stages as graph

log = logging.getLogger(__name__)

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


class K8sError(RuntimeError):
    """A problem with the manifests, the settings or the cluster, with a message for the user."""


# ---------------------------------------------------------------- render


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


def _set_env_values(text: str, values: dict[str, str]) -> tuple[str, set[str]]:
    """Replace ``KEY=...`` lines of an env file; return the new text and the keys found."""
    found: set[str] = set()
    lines = []
    for line in text.splitlines():
        match = ENV_LINE_RE.match(line)
        if match and match.group(2) in values:
            found.add(match.group(2))
            line = f"{match.group(1)}{match.group(2)}={values[match.group(2)]}"
        lines.append(line)
    return "\n".join(lines) + "\n", found


def _set_images(kustomization: Path, registry: str | None, tag: str | None) -> None:
    import yaml

    doc = yaml.safe_load(kustomization.read_text())
    if not isinstance(doc, dict) or not doc.get("images"):
        return
    for image in doc["images"]:
        if registry:
            image["newName"] = f"{registry.rstrip('/')}/{image['name']}"
        if tag:
            image["newTag"] = tag
    kustomization.write_text(yaml.safe_dump(doc, sort_keys=False))


def prepare_tree(
    dest: Path,
    overlay: str,
    *,
    settings: dict[str, str] | None = None,
    registry: str | None = None,
    tag: str | None = None,
    k8s_dir: str | Path | None = None,
    dpo: bool = False,
) -> Path:
    """Copy ``k8s/`` to ``dest`` with the run's settings written in; return the copy's overlay folder.

    ``dpo``: list the dpo component (k8s/components/dpo) first in the overlay's kustomization (not in its
    per-stage ones: the component adds the dpo Job, which a one-stage kustomization must not get)."""
    src = Path(k8s_dir or default_k8s_dir())
    if not (src / "overlays" / overlay / "kustomization.yaml").is_file():
        known = sorted(p.name for p in (src / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
        raise K8sError(f"no overlay {overlay!r} under {src / 'overlays'}; known: {', '.join(known)}")
    tree = dest / "k8s"
    # Filled-in secret files (k8s/secrets/*.env) never travel with the copy; the pipeline settings do.
    shutil.copytree(
        src,
        tree,
        ignore=lambda _dir, names: [
            n for n in names if (n.endswith(".env") and n != "pipeline.env") or n == "__pycache__"
        ],
    )
    values = {k: str(v) for k, v in (settings or {}).items()}
    for key, value in values.items():
        if not ENV_LINE_RE.match(f"{key}={value}") or "\n" in value:
            raise K8sError(f"setting {key}={value!r}: a name of letters, digits and '_', a one-line value")
    if "RUN_ID" in values:
        check_run_id(values["RUN_ID"])
    # Only the env files this overlay is built from: another overlay's values must not count as "found".
    found: set[str] = set()
    for env_file in env_files(tree / "overlays" / overlay):
        text, keys = _set_env_values(env_file.read_text(), values)
        env_file.write_text(text)
        found |= keys
    missing = {k: v for k, v in values.items() if k not in found}
    if missing:  # new keys go to the overlay's own settings, merged last
        own = tree / "overlays" / overlay / "settings" / "pipeline.env"
        with own.open("a") as f:
            f.write("# added by cmv k8s render\n" + "".join(f"{k}={v}\n" for k, v in missing.items()))
    if registry or tag:
        for kustomization in tree.rglob("kustomization.yaml"):
            _set_images(kustomization, registry, tag)
    if values.get("KUEUE_QUEUE"):
        _add_component(tree / "overlays" / overlay, tree / "base" / "kueue")
    if dpo:
        if not (tree / DPO_COMPONENT / "kustomization.yaml").is_file():
            raise K8sError(f"--dpo needs the dpo component, {src / DPO_COMPONENT}/kustomization.yaml: not found")
        # First, as the component says: the overlay's settings then patch the dpo Job like the other Jobs.
        _add_component(tree / "overlays" / overlay, tree / DPO_COMPONENT, first=True, stages=False)
    return tree / "overlays" / overlay


def _add_component(overlay_dir: Path, component: Path, first: bool = False, stages: bool = True) -> None:
    """List ``component`` (before base/derive, or ``first``) in the overlay's kustomization and (``stages``)
    in each of its stages'."""
    import yaml

    stage_files = list(overlay_dir.glob("*/kustomization.yaml")) if stages else []
    for kustomization in [overlay_dir / "kustomization.yaml", *stage_files]:
        doc = yaml.safe_load(kustomization.read_text())
        if doc.get("kind") == "Component":
            continue
        comps = doc.setdefault("components", [])
        rel = os.path.relpath(component, kustomization.parent)
        if any(os.path.normpath(c) == os.path.normpath(rel) for c in comps):
            continue  # the overlay lists it already (by hand)
        at = 0 if first else next((i for i, c in enumerate(comps) if c.rstrip("/").endswith("base/derive")), len(comps))
        comps.insert(at, rel)
        kustomization.write_text(yaml.safe_dump(doc, sort_keys=False))


def env_files(kustomization_dir: Path, seen: set[Path] | None = None) -> list[Path]:
    """The configMapGenerator env files a kustomization is built from, its bases' and components' included."""
    import yaml

    seen = set() if seen is None else seen
    kdir = kustomization_dir.resolve()
    if kdir in seen or not (kdir / "kustomization.yaml").is_file():
        return []
    seen.add(kdir)
    doc = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
    out: list[Path] = []
    for ref in [*(doc.get("resources") or []), *(doc.get("components") or [])]:
        if (kdir / ref).is_dir():
            out += env_files(kdir / ref, seen)
    for generator in doc.get("configMapGenerator") or []:
        out += [kdir / e for e in generator.get("envs") or []]
    return out


def kustomize(path: str | Path) -> str:
    """``kubectl kustomize PATH`` (offline; kubectl ships kustomize)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise K8sError("rendering needs kubectl (it includes kustomize) on PATH")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise K8sError(f"kubectl kustomize {path} failed:\n{proc.stderr.strip()}")
    return proc.stdout


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


def render(
    overlay: str,
    *,
    stage: str | None = None,
    settings: dict[str, str] | None = None,
    registry: str | None = None,
    tag: str | None = None,
    k8s_dir: str | Path | None = None,
    dpo: bool = False,
) -> str:
    """The manifests (YAML) of one run: the whole pipeline, or one stage's kustomization.

    ``dpo``: with the dpo stage (the dpo component). One stage of such a run (and the dpo stage of any run:
    no overlay has a dpo kustomization) is the whole run's render cut to the ConfigMap and that stage's
    objects, so that generate's Job has its --dpo argument.
    """
    whole = dpo or stage == "dpo"
    tag = tag or default_tag()
    with tempfile.TemporaryDirectory(prefix="cmv-k8s-") as tmp:
        leaf = prepare_tree(Path(tmp), overlay, settings=settings, registry=registry, tag=tag, k8s_dir=k8s_dir, dpo=dpo)
        if stage and not whole:
            leaf = leaf / stage
            if not (leaf / "kustomization.yaml").is_file():
                raise K8sError(f"overlay {overlay!r} has no stage {stage!r}")
        text = kustomize(leaf)
    check_image_tags(text)
    text = stamp_rendered(text)
    return only_stage(text, stage) if stage and whole else text


def only_stage(text: str, stage: str) -> str:
    """The rendered run cut to its pipeline ConfigMap and the objects of ``stage``."""
    import yaml

    docs = [d for d in yaml.safe_load_all(text) if d]
    keep = [
        d
        for d in docs
        if (d.get("kind") == "ConfigMap" and d["metadata"]["name"].startswith("cmv-pipeline"))
        or (d["metadata"].get("labels") or {}).get(STAGE_LABEL) == stage
    ]
    if not any(d.get("kind") in WORKLOAD_KINDS for d in keep):
        raise K8sError(f"this run has no {stage} stage" + (" (add --dpo: the dpo component)" if stage == "dpo" else ""))
    return yaml.safe_dump_all(keep, sort_keys=False)


def stamp_rendered(text: str) -> str:
    """The rendered manifests with every stage workload's settings hash (as :func:`plan` stamps them), so that
    ``cmv k8s render | kubectl apply -f -`` makes Jobs that a later ``cmv k8s submit`` of the same settings adopts."""
    import yaml

    docs = [d for d in yaml.safe_load_all(text) if d]
    config = next(
        (d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"].startswith("cmv-pipeline")), None
    )
    workloads = [
        d
        for d in docs
        if d.get("kind") in WORKLOAD_KINDS and (d["metadata"].get("labels") or {}).get(STAGE_LABEL) in PIPELINE
    ]
    if config is None or not workloads:
        return text
    values = dict(config.get("data") or {})
    recipe = load_recipe_here(values.get("CMV_RECIPE"))
    check_dpo_run({w["metadata"]["labels"][STAGE_LABEL]: w for w in workloads}, recipe, values.get("CMV_RECIPE"))
    for workload in workloads:
        stamp_settings(workload, values, recipe)
    return yaml.safe_dump_all(docs, sort_keys=False)


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


def default_tag() -> str | None:
    """``git describe --always --dirty`` of the repository, as ``make images`` tags (None outside a checkout)."""
    repo = default_k8s_dir().resolve().parent
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


PLACEHOLDER_TAG = "set-a-tag"  # the gpu overlay's tag until render sets the real one


def check_image_tags(manifests: str) -> None:
    """Every image has an explicit tag or digest, never ``latest`` (a node may run any build under it)."""
    bad = sorted(
        {
            m.group(1)
            for m in re.finditer(r"^\s*-?\s*image:\s*['\"]?([^\s'\"]+)", manifests, re.M)
            if not re.search(r"(@sha256:[0-9a-f]{64}|:[\w][\w.-]{0,127})$", m.group(1).split("/")[-1])
            or m.group(1).endswith((":latest", f":{PLACEHOLDER_TAG}"))
        }
    )
    if bad:
        raise K8sError(
            f"images without a tag, or tagged latest: {', '.join(bad)}; pass --tag (the TAG of make push, "
            "default `git describe --always --dirty`), or render from a git checkout"
        )


def render_objects(overlay: str, **kwargs: Any) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(render(overlay, **kwargs)) if doc]


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


def _json_safe(value: Any) -> Any:
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
    return _json_safe(
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


def _config_differences(wanted: Any, recorded: Any, where: str) -> list[str]:
    """The keys the recipe sets whose value the manifest's resolved config does not have."""
    if isinstance(wanted, dict) and isinstance(recorded, dict):
        out = []
        for key, value in wanted.items():
            if key in recorded:
                out += _config_differences(value, recorded[key], f"{where}.{key}" if where else str(key))
        return out
    if isinstance(recorded, dict):  # a name the stage resolved into a structure (train.deepspeed: zero2)
        return []
    wanted, recorded = _json_safe(wanted), _json_safe(recorded)
    same = wanted == recorded or (isinstance(wanted, list) and isinstance(recorded, list) and wanted == recorded)
    return [] if same else [f"{where}: {recorded!r} -> {wanted!r}"]


def manifest_mismatch(run: Plan, stage: str, manifest: dict, recipe: dict | None = None) -> str | None:
    """Why the stage's ``_SUCCESS`` manifest is not the output of this run's settings; None when it is.

    Its inputs must be this run's upstream outputs as they are now (the digest of each upstream
    ``_SUCCESS``), and every value the recipe sets for the stage (and the model) must be the resolved config
    it recorded. A raw input is compared by URI only (its fingerprint needs a listing of the dump).
    """
    import hashlib

    from cmv_core import storage

    written_as = "train" if stage == "dpo" else stage  # `cmv train --method dpo` writes a train manifest
    if manifest.get("stage") not in (None, written_as):
        return f"it is the manifest of stage {manifest.get('stage')!r}"
    config = manifest.get("config") or {}
    if stage == "dpo" and config.get("method") != "dpo":
        return "it is not a DPO output (its config has no method: dpo)"
    recorded = {i.get("uri"): i.get("digest", "") for i in manifest.get("inputs") or []}
    expected = [run.stage_uri(u) for u in run.upstream(stage)] or [run.settings.get("RAW_INPUT", "")]
    for uri in expected:
        if uri not in recorded:
            return f"it was made from {', '.join(sorted(map(str, recorded))) or 'no inputs'}, not {uri}"
    for uri, digest in recorded.items():
        if str(digest).startswith("sha256:"):
            try:
                now = "sha256:" + hashlib.sha256(storage.read_bytes(storage.join(uri, storage.SUCCESS))).hexdigest()
            except FileNotFoundError:
                return f"its input {uri} has no {storage.SUCCESS} any more"
            if now != digest:
                return f"its input {uri} changed since (another {storage.SUCCESS} there now)"
    model = run.settings.get("CMV_MODEL")
    # {"<stage>": {...}, "model": base model} (format, train); a flat config's "model" is the stage's own (judge);
    # dpo: {"train": {...}, "model": the SFT model it trained on, "base_model": the base model}
    nested = isinstance(config.get(written_as), dict)
    base = config.get("base_model" if stage == "dpo" else "model")
    if model and nested and isinstance(base, str) and base != model:
        return f"config changed: model: {base!r} -> {model!r}"
    wanted = recipe.get(stage) if recipe is not None else None
    if stage == "dpo" and isinstance(wanted, dict):
        from cmv_core.stages import dpo_over_train

        wanted = dpo_over_train(recipe)
    if isinstance(wanted, dict):
        section = config[written_as] if nested else config
        diffs = _config_differences(wanted, section, stage)
        if diffs:
            return "config changed: " + "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
    return None


@dataclass
class Plan:
    """The rendered run, split the way submit creates it."""

    run_id: str
    config: dict  # the pipeline ConfigMap
    stages: dict[str, list[dict]]  # stage -> its objects (Service before Job)
    other: list[dict] = field(default_factory=list)  # e.g. MinIO in dev: applied separately
    recipe: dict | None = None  # the recipe as read from here (None: not readable; its path is compared)

    @property
    def settings(self) -> dict[str, str]:
        return dict(self.config.get("data") or {})

    @property
    def order(self) -> list[str]:
        """This run's stages in pipeline order: the five, and dpo when rendered with it (the dpo component)."""
        return [s for s in PIPELINE if s in self.stages]

    def upstream(self, stage: str) -> list[str]:
        return upstream(stage, dpo="dpo" in self.stages)

    def job(self, stage: str) -> dict:
        """The stage's workload: its Job, or for train in the jobset overlay its JobSet."""
        return next(o for o in self.stages[stage] if o["kind"] in WORKLOAD_KINDS)

    def stage_uri(self, stage: str) -> str:
        from cmv_core import storage

        return storage.join(self.settings["ARTIFACT_ROOT"], self.run_id, stage)


def plan(objects: list[dict]) -> Plan:
    configs = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("cmv-pipeline")]
    if len(configs) != 1:
        raise K8sError(f"expected one cmv-pipeline ConfigMap in the manifests, found {len(configs)}")
    config = configs[0]
    stages: dict[str, list[dict]] = {s: [] for s in PIPELINE}
    other = []
    for obj in objects:
        stage = (obj["metadata"].get("labels") or {}).get(STAGE_LABEL)
        if stage in stages:
            stages[stage].append(obj)
        elif obj is not config:
            other.append(obj)
    stages = {s: objs for s, objs in stages.items() if objs or s not in OPTIONAL_STAGES}
    for stage in stages:
        stages[stage].sort(key=lambda o: o["kind"] in WORKLOAD_KINDS)  # the Service exists before the pods look it up
    values = dict(config.get("data") or {})
    recipe = load_recipe_here(values.get("CMV_RECIPE"))
    workloads = {s: next((o for o in objs if o["kind"] in WORKLOAD_KINDS), None) for s, objs in stages.items()}
    check_dpo_run({s: w for s, w in workloads.items() if w is not None}, recipe, values.get("CMV_RECIPE"))
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS and (obj["metadata"].get("labels") or {}).get(STAGE_LABEL) in PIPELINE:
            stamp_settings(obj, values, recipe)
    return Plan(run_id=values["RUN_ID"], config=config, stages=stages, other=other, recipe=recipe)


# ---------------------------------------------------------------- cluster


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


def _is_status(exc: BaseException, code: int) -> bool:
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


class SettingsConflict(K8sError):
    pass


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
        if not _is_status(exc, 409):
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


JOBSET_API = ("jobset.x-k8s.io", "v1alpha2")
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"


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
        if _is_status(exc, 404):
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
        if not _is_status(exc, 404):
            raise
    deadline = time.monotonic() + timeout_s
    while read_job(cluster, name, kind) is not None or job_pods(cluster, name, kind):
        if time.monotonic() > deadline:
            raise K8sError(f"Job {name} and its pods were not gone within {timeout_s:.0f} s of deleting it")
        time.sleep(poll_s)


def _parse_log_line(raw: str) -> tuple[str, str]:
    """``<RFC3339Nano timestamp> <text>`` (timestamps=true) -> (timestamp, text)."""
    stamp, _, text = raw.partition(" ")
    return stamp, text


class LogStreamer:
    """Follows the logs of a Job's pods, one thread each, printing lines prefixed with the pod's name.

    A stream that breaks while the pod still runs (API server restart, load balancer idle timeout) is
    opened again from ``sinceTime`` = the last line's second; the lines of that second already printed
    (same timestamp and text) are dropped, so no line is lost or printed twice.
    """

    def __init__(
        self,
        cluster: Cluster,
        out: Callable[[str], None],
        container: str = "main",
        reconnects: int = 20,
        retry_s: float = 1.0,
    ):
        self.cluster, self.out, self.container = cluster, out, container
        self.reconnects, self.retry_s = reconnects, retry_s
        self.threads: dict[str, threading.Thread] = {}

    def follow(self, pods: list[Any]) -> None:
        for pod in pods:
            name = pod.metadata.name
            started = pod.status.phase in ("Running", "Succeeded", "Failed")
            if started and name not in self.threads:
                thread = threading.Thread(target=self._stream, args=(name,), daemon=True)
                self.threads[name] = thread
                thread.start()

    def _open(self, pod: str, since: str | None) -> Any:
        query = [("container", self.container), ("follow", "true"), ("timestamps", "true")]
        if since:
            query.append(("sinceTime", since))  # not a parameter of the generated read_namespaced_pod_log
        return self.cluster.core.api_client.call_api(
            "/api/v1/namespaces/{namespace}/pods/{name}/log",
            "GET",
            path_params={"namespace": self.cluster.namespace, "name": pod},
            query_params=query,
            header_params={"Accept": "*/*"},
            auth_settings=["BearerToken"],
            _preload_content=False,
        )

    def _pod_running(self, pod: str) -> bool:
        try:
            phase = self.cluster.core.read_namespaced_pod(pod, self.cluster.namespace).status.phase
        except Exception:
            return False
        return phase in ("Pending", "Running")

    def _stream(self, pod: str) -> None:
        since: str | None = None
        seen: set[tuple[str, str]] = set()  # lines of the second `since` (sent again after a reconnect)
        for attempt in range(self.reconnects + 1):
            ended = False
            try:
                resp = self._open(pod, since)
                pending = b""
                for chunk in resp.stream(amt=65536, decode_content=True):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        stamp, text = _parse_log_line(raw.decode("utf-8", errors="replace"))
                        if (stamp, text) in seen:
                            continue
                        second = stamp[:19]
                        if since is None or second != since[:19]:
                            seen = set()
                            since = second + "Z"
                        seen.add((stamp, text))
                        self.out(f"[{pod}] {text}")
                ended = True
            except Exception as exc:  # a broken stream: reconnect below while the pod runs
                log.warning(
                    "log stream of %s broke (%s: %s); reconnecting from %s",
                    pod,
                    type(exc).__name__,
                    exc,
                    since or "the start",
                )
            if ended and not self._pod_running(pod):
                return
            if attempt < self.reconnects:
                time.sleep(self.retry_s)
        log.warning("gave up following the log of %s after %d reconnects", pod, self.reconnects)

    def join(self, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))


def tail_logs(cluster: Cluster, pod: str, lines: int, container: str = "main") -> str:
    try:
        # Raw bytes: the client's own decoding of a text/plain body is unreliable across versions.
        resp = cluster.core.read_namespaced_pod_log(
            pod, cluster.namespace, container=container, tail_lines=lines, _preload_content=False
        )
        return resp.data.decode("utf-8", errors="replace")
    except Exception as exc:
        return f"(no log: {exc})"


def wait_for_job(
    cluster: Cluster,
    name: str,
    *,
    poll_s: float = 5,
    timeout_s: float = 0,
    streamer: LogStreamer | None = None,
    kind: str = "Job",
) -> Any:
    """Wait until the Job succeeds or fails (or timeout_s, when > 0); stream its pods' logs meanwhile."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    last = None
    while True:
        job = read_job(cluster, name, kind)
        if job is None:
            raise K8sError(f"{kind} {name} disappeared while waiting for it (deleted by someone?)")
        state = job_state(job)
        if streamer is not None:
            streamer.follow(job_pods(cluster, name, kind))
        if state != last:
            log.info("%s %s: %s", kind, name, state)
            last = state
        if state in ("succeeded", "failed"):
            if streamer is not None:
                streamer.join()
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise K8sError(f"Job {name} still {state} after {timeout_s:.0f} s (left running)")
        time.sleep(poll_s)


# ---------------------------------------------------------------- run state


def read_manifest(uri: str) -> tuple[bool | None, dict | None]:
    """(whether ``uri/_SUCCESS`` exists, its content); (None, None) when the store cannot be reached from here."""
    import json

    from cmv_core import storage

    try:
        return True, json.loads(storage.read_bytes(storage.join(uri, storage.SUCCESS)))
    except FileNotFoundError:
        return False, None
    except Exception as exc:
        log.warning("cannot check %s from here (%s: %s); relying on the Jobs' status", uri, type(exc).__name__, exc)
        return None, None


@dataclass
class StageStatus:
    stage: str
    job: str
    state: str  # absent, pending, running, succeeded, failed
    success: bool | None  # _SUCCESS in the artifact store (None: not checked / unreachable)
    pods: str = ""
    stale: str | None = None  # why the _SUCCESS (or the completed Job) is not this run's settings' output
    same_settings: bool | None = None  # the existing Job's settings hash is ours (None: no Job)

    @property
    def done(self) -> bool:
        if self.stale:
            return False
        if self.success is not None:
            return self.success
        return self.state == "succeeded" and bool(self.same_settings)


def stage_status(cluster: Cluster, run: Plan, stage: str, check_store: bool = True) -> StageStatus:
    wanted = run.job(stage)
    name = wanted["metadata"]["name"]
    job = read_job(cluster, name, wanted["kind"])
    pods, same = "", None
    if job is not None:
        s = job.status
        pods = f"active {s.active or 0}, succeeded {s.succeeded or 0}, failed {s.failed or 0}"
        same = job_settings_hash(job) == job_settings_hash(wanted)
    success, manifest = read_manifest(run.stage_uri(stage)) if check_store else (None, None)
    stale = None
    if manifest is not None:
        try:
            stale = manifest_mismatch(run, stage, manifest, run.recipe)
        except Exception as exc:  # an upstream unreadable from here: the stage's own check decides
            stale = f"its inputs cannot be compared from here ({type(exc).__name__}: {exc})"
    elif success is None and job is not None and job_state(job) == "succeeded" and not same:
        stale = "its Job completed with other settings"
    return StageStatus(stage, name, job_state(job), success, pods, stale, same)


def status(cluster: Cluster, run: Plan, check_store: bool = True) -> list[StageStatus]:
    out = []
    store_ok = check_store
    for stage in run.order:
        st = stage_status(cluster, run, stage, store_ok)
        if st.success is None:
            store_ok = False  # unreachable once: do not wait on it for every stage
        out.append(st)
    return out


# ---------------------------------------------------------------- submit


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


ARGO_HAS_NO_DPO = (
    "--engine argo has no dpo step (its WorkflowTemplate runs the five stages): run DPO with "
    "--engine jobs and --overlay multinode (or gpu)"
)


def argo_template(run: Plan) -> dict:
    from cmv_core.k8s import argo as k8s_argo

    if run.job("train")["kind"] != "JobSet":
        raise K8sError("--engine argo runs the train stage as a JobSet: use --overlay jobset")
    if "dpo" in run.stages:
        raise K8sError(ARGO_HAS_NO_DPO)
    return k8s_argo.workflow_template(run)


def submit_argo(cluster: Cluster, run: Plan, out: Callable[[str], None] = print) -> int:
    """Create the run's ConfigMap and WorkflowTemplate (replaced when it exists), and one Workflow from it.

    Nothing to keep alive here: the DAG runs in the cluster. A template of this run with other settings is
    replaced only while no Workflow of it is running, which Argo itself does not check: say so.
    """
    from kubernetes.client.exceptions import ApiException

    from cmv_core.k8s import argo as k8s_argo

    template = argo_template(run)
    create_object(cluster, run.config)
    group, version = k8s_argo.ARGO_API
    name = template["metadata"]["name"]
    try:
        cluster.custom.create_namespaced_custom_object(group, version, cluster.namespace, "workflowtemplates", template)
    except ApiException as exc:
        if not _is_status(exc, 409):
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
        group, version, cluster.namespace, "workflows", k8s_argo.workflow(template)
    )
    workflow_name = created["metadata"]["name"]
    out(f"Workflow {workflow_name} created from WorkflowTemplate {name}: the pipeline runs in the cluster")
    out(f"follow it: argo watch -n {cluster.namespace} {workflow_name}   (or argo logs -f ...)")
    out(f"report, when it has finished: {run.stage_uri('judge')}/report.md")
    return 0


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


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="k8s_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--overlay", default="dev", help=f"k8s/overlays/<name>: {', '.join(OVERLAYS)} (default: dev)")
        p.add_argument("--run-id", help="the run (Job names cmv-<stage>-<run id>); default: the overlay's RUN_ID")
        p.add_argument("--nodes", type=int, help="train over this many nodes (NNODES)")
        p.add_argument("--gpus-per-node", type=int, help="GPUs and torchrun processes per train pod (NPROC_PER_NODE)")
        p.add_argument("--recipe", help="recipe inside the image (configs/...) or s3:// URI (CMV_RECIPE)")
        p.add_argument("--model", help="model spec (CMV_MODEL)")
        p.add_argument("--artifact-root", help="where runs live, e.g. s3://bucket/runs (ARTIFACT_ROOT)")
        p.add_argument("--raw-input", help="the raw dump for clean (RAW_INPUT)")
        p.add_argument(
            "--setting",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any other pipeline.env value (repeatable), e.g. --setting INPUT_WAIT_S=600",
        )
        p.add_argument("--registry", help="image registry, e.g. registry.example.com/cmv (as in make push)")
        p.add_argument("--tag", help="image tag (as in make push; default: `git describe --always --dirty`, as make)")
        p.add_argument("--k8s-dir", help="the kustomize tree (default: the repository's k8s/)")
        p.add_argument(
            "--dpo",
            action="store_true",
            help="with the DPO stage (k8s/components/dpo): a second train Job after train, from the "
            "SFT output, and generate's dpo variant; the recipe needs a dpo: section. Not with the "
            "jobset overlay or --engine argo",
        )

    def cluster_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--namespace", help="default: the kubeconfig context's namespace, else 'default'")
        p.add_argument("--context", help="kubeconfig context (default: the current one)")
        p.add_argument(
            "--no-store-check",
            action="store_true",
            help="do not look for _SUCCESS in the artifact store from here; trust the Jobs' status",
        )

    def engine(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--engine",
            choices=["jobs", "argo"],
            default="jobs",
            help="jobs: one Job per stage, run in order from here (default, nothing to install); "
            "argo: one Argo WorkflowTemplate running the whole DAG in the cluster (overlay jobset)",
        )

    p = sub.add_parser("render", help="print the manifests of a run (kubectl apply -f - them, or inspect)")
    common(p)
    engine(p)
    p.add_argument("--stage", choices=PIPELINE, help="only this stage's kustomization (with the ConfigMap)")

    p = sub.add_parser("submit", help="run the pipeline's Jobs in order, stream logs, stop on failure, resume")
    common(p)
    cluster_args(p)
    p.add_argument(
        "--stages",
        nargs="+",
        choices=PIPELINE,
        help="run only these, in this order (default: every stage of the run; dpo with --dpo)",
    )
    p.add_argument("--poll", type=float, default=5, help="seconds between Job status checks")
    p.add_argument("--stage-timeout", type=float, default=0, help="give up waiting on a stage after this (0: never)")
    p.add_argument("--tail", type=int, default=40, help="log lines shown from a failed pod")
    engine(p)

    p = sub.add_parser("status", help="each stage's Job state and _SUCCESS for a run")
    common(p)
    cluster_args(p)


def _plan_from_args(args: argparse.Namespace) -> Plan:
    settings = run_settings(
        args.run_id,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        recipe=args.recipe,
        model=args.model,
        artifact_root=args.artifact_root,
        raw_input=args.raw_input,
        extra=args.setting,
    )
    objects = render_objects(
        args.overlay, settings=settings, registry=args.registry, tag=args.tag, k8s_dir=args.k8s_dir, dpo=args.dpo
    )
    return plan(objects)


def _print(line: str) -> None:
    print(line, flush=True)


def cli_main(args: argparse.Namespace) -> int:
    try:
        if args.dpo and getattr(args, "engine", "jobs") == "argo":
            raise K8sError(ARGO_HAS_NO_DPO)
        if args.k8s_command == "render":
            settings = run_settings(
                args.run_id,
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                recipe=args.recipe,
                model=args.model,
                artifact_root=args.artifact_root,
                raw_input=args.raw_input,
                extra=args.setting,
            )
            if args.engine == "argo":
                import yaml

                run = _plan_from_args(args)
                sys.stdout.write(yaml.safe_dump_all([run.config, argo_template(run)], sort_keys=False))
                return 0
            sys.stdout.write(
                render(
                    args.overlay,
                    stage=args.stage,
                    settings=settings,
                    registry=args.registry,
                    tag=args.tag,
                    k8s_dir=args.k8s_dir,
                    dpo=args.dpo,
                )
            )
            return 0
        # The store check is a convenience: a store unreachable from here should fail fast, not retry for a minute.
        os.environ.setdefault("CMV_S3_MAX_ATTEMPTS", "2")
        run = _plan_from_args(args)
        cluster = connect(args.namespace, args.context)
        if args.k8s_command == "status":
            rows = status(cluster, run, check_store=not args.no_store_check)
            _print(f"run {run.run_id} in namespace {cluster.namespace} (artifacts: {run.stage_uri('')})")
            _print(f"{'stage':<10} {'job':<32} {'state':<10} {'_SUCCESS':<9} pods")
            for r in rows:
                success = {True: "yes", False: "no", None: "?"}[r.success]
                _print(f"{r.stage:<10} {r.job:<32} {r.state:<10} {success:<9} {r.pods}")
            return 0
        if args.engine == "argo":
            return submit_argo(cluster, run, out=_print)
        return submit(
            cluster,
            run,
            stages=args.stages,
            check_store=not args.no_store_check,
            poll_s=args.poll,
            stage_timeout_s=args.stage_timeout,
            tail=args.tail,
            out=_print,
        )
    except K8sError as exc:
        print(f"cmv k8s {args.k8s_command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the API's answer after the retries, in one line instead of a traceback
        try:
            from kubernetes.client.exceptions import ApiException
            from urllib3.exceptions import HTTPError
        except ImportError:
            raise exc from None
        if not isinstance(exc, (ApiException, HTTPError)):
            raise
        print(f"cmv k8s {args.k8s_command}: error: {api_error_line(exc)}", file=sys.stderr)
        return 2
