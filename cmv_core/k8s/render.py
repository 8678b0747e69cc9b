"""Rendering a run: the kustomize tree with the run's settings written in, and the :class:`Plan` made from it.

``render`` copies ``k8s/`` to a temporary folder, writes the run's settings
into that copy's ``pipeline.env`` files (and the image registry/tag into its
``images:``), and runs ``kubectl kustomize``: the output is exactly what a user
gets by editing those files and running ``kubectl kustomize`` themselves.

``--dpo`` adds the optional dpo stage (the ``components/dpo`` component, listed first in the copy's overlay):
a second train Job between train and generate (``cmv train --method dpo``, image cmv-train), handled like
train; generate reads its output. Not with the jobset overlay or the Argo engine (a one-line error).

Heavy imports (``yaml``) happen inside functions: the clean image has none.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmv_core.k8s.names import (
    DPO_COMPONENT,
    ENV_LINE_RE,
    OPTIONAL_STAGES,
    PIPELINE,
    STAGE_LABEL,
    WORKLOAD_KINDS,
    K8sError,
    check_run_id,
    default_k8s_dir,
    upstream,
)
from cmv_core.k8s.settings import check_dpo_run, load_recipe_here, stamp_settings


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


def _write_settings(tree: Path, overlay: str, values: dict[str, str]) -> None:
    """Write ``values`` into the env files the overlay is built from; new keys go to its own pipeline.env."""
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
    _write_settings(tree, overlay, values)
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
