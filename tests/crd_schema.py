"""Strict validation of custom resources (JobSet, TrainJob, Argo WorkflowTemplate) against their projects'
published CRDs (tests/data/crds, provenance in its README), as the API server validates them: the version's
``openAPIV3Schema`` with every object that lists its ``properties`` closed to other fields (unless it says
``x-kubernetes-preserve-unknown-fields``), ``x-kubernetes-int-or-string`` as integer or string, enums checked."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "data" / "crds"


def _strict(schema: dict) -> dict:
    """The Kubernetes structural schema as plain JSON Schema, unknown fields rejected."""
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: _strict(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict(v) for v in value]
        elif key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # metadata is the API server's ObjectMeta, not described by the CRD
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                out[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return out


def kinds() -> set[tuple[str, str]]:
    return set(_schemas())


def validate(obj: dict) -> None:
    """Raise jsonschema.ValidationError when ``obj`` is not a valid instance of its CRD (KeyError: no CRD)."""
    schema = _schemas()[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft7Validator(schema).validate(obj)
