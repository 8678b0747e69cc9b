"""The dpo component (k8s/components/dpo): a second train Job for DPO, rendered into each overlay."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO

from cmv_core import cli
from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render

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
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": resources,
                "components": components,
            }
        )
    )
    out = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(here)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_dpo_job_is_a_second_train_job_reading_the_sft_output(tmp_path, overlay):
    docs = render_with_dpo(tmp_path, overlay)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cmv-pipeline"))
    env = config["data"]
    by = {(d["kind"], d["metadata"]["labels"].get("cmv.io/stage")): d for d in docs if d["kind"] in ("Job", "Service")}
    train, dpo, service = by[("Job", "train")], by[("Job", "dpo")], by[("Service", "dpo")]
    name = f"cmv-dpo-{env['RUN_ID']}"
    assert (
        dpo["metadata"]["name"] == service["metadata"]["name"] == dpo["spec"]["template"]["spec"]["subdomain"] == name
    )
    assert service["spec"]["selector"] == {"cmv.io/stage": "dpo", "cmv.io/run-id": env["RUN_ID"]}
    # sized and launched like the train Job (same torchrun contract, same resources)
    assert (
        dpo["spec"]["completions"] == dpo["spec"]["parallelism"] == train["spec"]["completions"] == int(env["NNODES"])
    )
    main = lambda job: job["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    assert main(dpo)["resources"] == main(train)["resources"] and main(dpo)["command"] == main(train)["command"]
    assert dpo["spec"]["podFailurePolicy"] == train["spec"]["podFailurePolicy"]

    # the same arguments `cmv run` gives the dpo step
    def expand(arg: str) -> str:
        for key in ("ARTIFACT_ROOT", "RUN_ID", "CMV_RECIPE"):
            arg = arg.replace(f"$({key})", env[key])
        return arg

    args = [expand(a) for a in main(dpo)["args"]]
    args = args[args.index("jobs.train") + 1 :]
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
        out = subprocess.run(
            ["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "cmv-dpo" not in out and "--dpo=" not in out


# ---------------------------------------------------------------- cmv k8s render --dpo (what submit --dpo creates)

TAG = "t-1234567"


def workloads_by_stage(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["labels"]["cmv.io/stage"]: d
        for d in docs
        if d["kind"] in k8s_names.WORKLOAD_KINDS and "cmv.io/stage" in d["metadata"].get("labels", {})
    }


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_render_dpo_is_the_component_listed_first_and_sizes_dpo_like_train(tmp_path, overlay):
    settings = {"RUN_ID": "d1", "MASTER_PORT": "29611", "HF_CACHE_SIZE": "77Gi"}
    if overlay != "dev":  # (KUEUE_QUEUE does not render with dev: base/kueue is added to dev/minio too)
        settings["KUEUE_QUEUE"] = "gpu-team"
    docs = k8s_render.render_objects(overlay, settings=settings, tag=TAG, dpo=True)
    hand_docs = render_with_dpo(tmp_path, overlay)
    by_hand = workloads_by_stage(hand_docs)
    assert k8s_render.plan(hand_docs).order == k8s_names.PIPELINE  # listed by hand, submit runs it too
    jobs = workloads_by_stage(docs)
    assert sorted(jobs) == sorted(k8s_names.PIPELINE) == sorted(by_hand)
    main = lambda job: job["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    for stage in ("dpo", "generate"):
        assert main(jobs[stage])["args"] == main(by_hand[stage])["args"]
    assert main(jobs["dpo"])["image"] == main(jobs["train"])["image"]
    assert main(jobs["dpo"])["image"].rsplit("/", 1)[-1] == f"cmv-train:{TAG}"  # no image of its own
    # what base/derive and base/kueue give the train gang, the dpo gang gets too
    for key in ("ports", "resources"):
        assert main(jobs["dpo"])[key] == main(jobs["train"])[key]
    assert main(jobs["dpo"])["ports"] == [{"containerPort": 29611, "name": "rendezvous"}]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["cmv-dpo-d1"]["spec"]["ports"][0]["port"] == 29611
    volumes = {v["name"]: v for v in jobs["dpo"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-cache"]["emptyDir"]["sizeLimit"] == "77Gi"
    assert jobs["dpo"]["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == settings.get("KUEUE_QUEUE")
    from test_k8s_cluster import restricted_violations

    assert restricted_violations(jobs["dpo"]["spec"]["template"]) == []


def test_render_one_stage_of_a_dpo_run(capsys):
    base = ["k8s", "render", "--overlay", "gpu", "--run-id", "d1", "--tag", TAG]
    assert cli.main([*base, "--dpo", "--stage", "dpo"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "ConfigMap") == [
        ("Job", "cmv-dpo-d1"),
        ("Service", "cmv-dpo-d1"),
    ]
    assert k8s_names.SETTINGS_ANNOTATION in next(d for d in docs if d["kind"] == "Job")["metadata"]["annotations"]
    assert cli.main([*base, "--dpo", "--stage", "generate"]) == 0
    (job,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d and d["kind"] == "Job"]
    assert "--dpo=$(ARTIFACT_ROOT)/$(RUN_ID)/dpo" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert cli.main([*base, "--stage", "generate"]) == 0  # without --dpo: as before
    assert "--dpo=" not in capsys.readouterr().out
    assert cli.main([*base, "--stage", "dpo"]) == 2
    assert "this run has no dpo stage (add --dpo: the dpo component)" in capsys.readouterr().err
    assert cli.main(["k8s", "render", "--overlay", "jobset", "--run-id", "d1", "--tag", TAG, "--dpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "the jobset overlay trains on a JobSet" in err
