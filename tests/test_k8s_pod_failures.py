"""`cmv k8s submit` when pods fail, in a fake API that judges each failed pod by the Job's own
podFailurePolicy and backoffLimit as rendered from k8s/base/<stage>/job.yaml (tests/fake_k8s_pods.py):
a drained node is retried without spending backoffLimit, a bad-input exit (2) fails the Job at once,
any other failure counts until backoffLimit."""

# The fake API fixture is imported by name from test_k8s_submit; tests take it as a parameter of that name.
# ruff: noqa: F811

from __future__ import annotations

import pytest

pytest.importorskip("kubernetes")

from fake_k8s_api import Script  # noqa: E402
from fake_k8s_pods import PodRun  # noqa: E402
from test_k8s_submit import fake, submit  # noqa: E402,F401  (the fake API fixture and the submit command)

from cmv_core import errors  # noqa: E402
from cmv_core.k8s import render as k8s_render  # noqa: E402

BAD_INPUT = errors.EXIT_BAD_INPUT  # what a stage exits with on bad input or settings (cmv_core/errors.py)


@pytest.fixture(scope="module")
def rendered_jobs() -> dict[str, dict]:
    """The gpu overlay's stage Jobs as `cmv k8s submit` POSTs them (what the fake judges pods by)."""
    run = k8s_render.plan(k8s_render.render_objects("gpu", settings={"RUN_ID": "t1"}))
    return {stage: run.job(stage)["spec"] for stage in run.order}


def pods_of(fake, job: str) -> list[dict]:
    return [fake._pod_view(p) for p in fake.pods.values() if p["_job"]["metadata"]["name"] == job]


def test_the_manifests_have_the_rules_these_tests_rely_on(rendered_jobs):
    """What the Job controller is told: drained nodes ignored, exit 2 fails the Job, the rest counted."""
    for stage, spec in rendered_jobs.items():
        rules = spec["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules, stage
        fail_job = [r for r in rules if r["action"] == "FailJob"]
        assert [r["onExitCodes"]["values"] for r in fail_job] == [[BAD_INPUT]], stage
        assert spec["backoffLimit"] >= 1, stage


def test_drained_nodes_do_not_spend_backoff_limit(fake, capsys, rendered_jobs):
    """More disrupted pods than backoffLimit allows failures, then one that succeeds: the stage succeeds."""
    limit = rendered_jobs["clean"]["backoffLimit"]
    drained = [PodRun(exit_code=137, disrupted=True, log=["evicted"]) for _ in range(limit + 1)]
    fake.scripts["clean"] = Script(run_s=0.15, pods=[*drained, PodRun(log=["clean ok"])])
    assert submit(fake, "--stages", "clean") == 0
    out = capsys.readouterr().out
    assert "=== clean: Job cmv-clean-t1 succeeded" in out and "FAILED" not in out
    pods = pods_of(fake, "cmv-clean-t1")
    assert [p["status"]["phase"] for p in pods] == ["Failed"] * (limit + 1) + ["Succeeded"]
    assert all(p["status"]["conditions"][0]["type"] == "DisruptionTarget" for p in pods[:-1])
    assert fake._job_view(fake.objects[("Job", "cmv-test", "cmv-clean-t1")])["status"]["failed"] == 0


def test_a_bad_input_exit_fails_the_job_at_once_without_retries(fake, capsys, rendered_jobs):
    """Exit 2 (bad input or settings): no second pod, the run stops at that stage and says why."""
    fake.scripts["format"] = Script(
        run_s=0.15, pods=[PodRun(exit_code=BAD_INPUT, log=["cmv format: error: no _SUCCESS under .../clean"])]
    )
    assert submit(fake, "--stages", "clean", "format", "train") == 1
    out = capsys.readouterr().out
    pods = pods_of(fake, "cmv-format-t1")
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Failed"
    name = pods[0]["metadata"]["name"]
    assert (
        f"stage format FAILED: Job cmv-format-t1: PodFailurePolicy: Container main for pod cmv-test/{name} "
        f"failed with exit code {BAD_INPUT} matching FailJob rule at index" in out
    )
    assert "cmv format: error: no _SUCCESS under .../clean" in out  # the pod's own last lines
    assert ("Job", "cmv-train-t1") not in fake.created()  # later stages not started


def test_other_failures_count_until_backoff_limit(fake, capsys, rendered_jobs):
    """Exit 1 on every pod: backoffLimit + 1 pods, then the Job fails with BackoffLimitExceeded."""
    limit = rendered_jobs["generate"]["backoffLimit"]
    crashes = [PodRun(exit_code=1, log=[f"crash {k}"]) for k in range(limit + 1)]
    fake.scripts["generate"] = Script(run_s=0.15, pods=crashes)
    assert submit(fake, "--stages", "generate") == 1
    out = capsys.readouterr().out
    assert len(pods_of(fake, "cmv-generate-t1")) == limit + 1
    assert "stage generate FAILED: Job cmv-generate-t1: BackoffLimitExceeded" in out
    assert f"crash {limit}" in out  # the last failed pod's log is in the report


def test_failures_up_to_backoff_limit_then_success_is_a_success(fake, capsys, rendered_jobs):
    limit = rendered_jobs["judge"]["backoffLimit"]
    fake.scripts["judge"] = Script(run_s=0.15, pods=[PodRun(exit_code=1)] * limit + [PodRun()])
    assert submit(fake, "--stages", "judge") == 0
    assert "=== judge: Job cmv-judge-t1 succeeded" in capsys.readouterr().out
    assert len(pods_of(fake, "cmv-judge-t1")) == limit + 1


def test_a_sigterm_stopped_train_pod_is_replaced_not_counted(fake, capsys, rendered_jobs):
    """Train's own rule: exit 143 (SIGTERM, checkpoint saved) is a disruption; exit 1 still counts."""
    limit = rendered_jobs["train"]["backoffLimit"]
    stopped = [PodRun(exit_code=143) for _ in range(limit + 1)]
    fake.scripts["train"] = Script(run_s=0.15, pods=[*stopped, PodRun(exit_code=1), PodRun()])
    assert submit(fake, "--stages", "train") == 0
    assert "=== train: Job cmv-train-t1 succeeded" in capsys.readouterr().out
    assert fake._job_view(fake.objects[("Job", "cmv-test", "cmv-train-t1")])["status"]["failed"] == 1
