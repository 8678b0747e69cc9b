"""The dpo component (k8s/components/dpo): a second train Job for DPO, rendered into each overlay."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO

from cmv_core import cli

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")

# (overlay, its components before derive, as the overlay lists them)
OVERLAYS = {
    "dev": ["settings"],
    "gpu": ["settings", "../../base/gpus-per-node"],
    "multinode": ["../gpu/settings", "settings", "../../base/gpus-per-node"],
}


def render_with_dpo(tmp_path, overlay: str) -> list[dict]:
    """The overlay with the dpo component listed first, as k8s/components/dpo/kustomization.yaml says."""
    here = tmp_path / overlay
    here.mkdir()
    rel = lambda p: os.path.relpath(REPO / "k8s" / "overlays" / overlay / p, here)  # noqa: E731
    resources = [rel("../../base")] + ([rel("minio")] if overlay == "dev" else [])
    components = [rel("../../components/dpo")] + [rel(c) for c in OVERLAYS[overlay]] + [rel("../../base/derive")]
    (here / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": resources, "components": components}))
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(here)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_dpo_job_is_a_second_train_job_reading_the_sft_output(tmp_path, overlay):
    docs = render_with_dpo(tmp_path, overlay)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cmv-pipeline"))
    env = config["data"]
    by = {(d["kind"], d["metadata"]["labels"].get("cmv.io/stage")): d for d in docs if d["kind"] in ("Job", "Service")}
    train, dpo, service = by[("Job", "train")], by[("Job", "dpo")], by[("Service", "dpo")]
    name = f"cmv-dpo-{env['RUN_ID']}"
    assert dpo["metadata"]["name"] == service["metadata"]["name"] == dpo["spec"]["template"]["spec"]["subdomain"] == name
    assert service["spec"]["selector"] == {"cmv.io/stage": "dpo", "cmv.io/run-id": env["RUN_ID"]}
    # sized and launched like the train Job (same torchrun contract, same resources)
    assert dpo["spec"]["completions"] == dpo["spec"]["parallelism"] == train["spec"]["completions"] == int(env["NNODES"])
    main = lambda job: job["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    assert main(dpo)["resources"] == main(train)["resources"] and main(dpo)["command"] == main(train)["command"]
    assert dpo["spec"]["podFailurePolicy"] == train["spec"]["podFailurePolicy"]
    # the same arguments `cmv run` gives the dpo step
    def expand(arg: str) -> str:
        for key in ("ARTIFACT_ROOT", "RUN_ID", "CMV_RECIPE"):
            arg = arg.replace(f"$({key})", env[key])
        return arg

    args = [expand(a) for a in main(dpo)["args"]]
    args = args[args.index("jobs.train") + 1:]
    local = cli.stage_argv("dpo", env["ARTIFACT_ROOT"], env["RUN_ID"], env["CMV_RECIPE"], [])
    assert local[:3] == ["train", "--method", "dpo"] and "--method=dpo" in args
    flags = dict(a.split("=", 1) for a in args if a.startswith("--"))
    for key, value in zip(local[3::2], local[4::2]):
        if key in ("--input", "--init", "--output", "--config", "--run-id"):
            assert flags[key] == value, key
    gen = [expand(a) for a in main(by[("Job", "generate")])["args"]]
    assert f"--dpo={env['ARTIFACT_ROOT']}/{env['RUN_ID']}/dpo" in gen
    local_gen = cli.stage_argv("generate", env["ARTIFACT_ROOT"], env["RUN_ID"], env["CMV_RECIPE"], [], dpo=True)
    assert local_gen[local_gen.index("--dpo") + 1] == f"{env['ARTIFACT_ROOT']}/{env['RUN_ID']}/dpo"


def test_overlays_without_the_component_are_unchanged():
    for overlay in OVERLAYS:
        out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
                             capture_output=True, text=True, check=True).stdout
        assert "cmv-dpo" not in out and "--dpo=" not in out
