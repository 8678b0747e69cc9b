"""checkov on every overlay's rendered manifests and on the Dockerfiles, with the allow-list k8s/checkov.yaml
(each skip says why it does not apply). checkov lives in its own venv (`make lint-tools`, pinned in
tests/lint-requirements.txt): its dependencies pin boto3 and packaging below what the project needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "k8s" / "checkov.yaml"


def checkov_bin() -> str:
    found = os.environ.get("CHECKOV") or str(REPO / ".venv-lint" / "bin" / "checkov")
    if not Path(found).exists():
        found = shutil.which("checkov") or ""
    if not found:
        # Required in every run, not skipped: a skip here let a plain `pytest` pass without linting.
        pytest.fail("checkov is missing: run `make lint-tools` (installs it into .venv-lint), or set $CHECKOV")
    return found


def run_checkov(*args: str) -> list[dict]:
    proc = subprocess.run(
        [checkov_bin(), "--config-file", str(CONFIG), "-o", "json", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout or "[]")
    return report if isinstance(report, list) else [report]


def failures(reports: list[dict]) -> list[str]:
    return [
        f"{f['check_id']} {f['check_name']}: {f['file_path']} {f.get('resource', '')}"
        for r in reports
        for f in r["results"]["failed_checks"]
    ]


def test_every_skipped_check_says_why():
    text = CONFIG.read_text()
    skipped = yaml.safe_load(text)["skip-check"]
    assert skipped
    lines = text.splitlines()
    for check in skipped:
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {check}")
        assert lines[at - 1].strip().startswith("#"), f"{check} has no reason above it"


@pytest.mark.slow
def test_checkov_passes_on_manifests_and_dockerfiles(tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for overlay in k8s_names.OVERLAYS:
        (manifests / f"{overlay}.yaml").write_text(k8s_render.render(overlay, tag="t-1234567"))
    reports = run_checkov("-d", str(manifests), "--framework", "kubernetes")
    assert sum(r["summary"]["passed"] for r in reports) > 100  # it did look at them
    assert failures(reports) == []
    reports = run_checkov("-d", str(REPO / "images"), "--framework", "dockerfile")
    assert sum(r["summary"]["resource_count"] for r in reports) == 5
    assert failures(reports) == []
    # ...and it does fail: a privileged container is reported
    bad = yaml.safe_load_all((manifests / "gpu.yaml").read_text())
    docs = [d for d in bad if d]
    job = next(d for d in docs if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    (manifests / "bad.yaml").write_text(yaml.safe_dump(job))
    found = failures(run_checkov("-f", str(manifests / "bad.yaml"), "--framework", "kubernetes"))
    assert any(re.match(r"CKV_K8S_16 ", f) for f in found), found
