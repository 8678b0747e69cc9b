"""`cmv k8s submit|status` against a fake Kubernetes API on loopback (tests/fake_k8s_api.py), with the real
`kubernetes` client configured through a kubeconfig: creation order, waiting, failure reports with the
failed pod's last log lines, and resuming a run from its first stage without _SUCCESS."""

from __future__ import annotations


import pytest

pytest.importorskip("kubernetes")

from cmv_core import cli  # noqa: E402
from fake_k8s_api import FakeK8s, Script, kubeconfig  # noqa: E402

STAGES = ["clean", "format", "train", "generate", "judge"]


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    server = FakeK8s()
    url = server.start()
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig(url))
    monkeypatch.setenv("KUBECONFIG", str(config))
    store = tmp_path / "store"

    def write_success(job: dict) -> None:  # what the real stage does last
        labels = job["metadata"]["labels"]
        out = store / labels["cmv.io/run-id"] / labels["cmv.io/stage"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "_SUCCESS").write_text("{}")

    server.on_success = write_success
    server.store = store
    yield server
    server.stop()


def submit(fake, *extra: str, run_id: str = "t1", overlay: str = "gpu") -> int:
    return cli.main(["k8s", "submit", "--overlay", overlay, "--run-id", run_id, "--artifact-root", str(fake.store),
                     "--poll", "0.05", *extra])


def test_creates_each_stage_after_the_previous_one_finished(fake, capsys):
    for stage in STAGES:
        fake.scripts[stage] = Script(run_s=0.4, log=[f"{stage} says hello", "done"])
    assert submit(fake) == 0
    out = capsys.readouterr().out
    created = fake.created()
    assert created[0][0] == "ConfigMap" and created[0][1].startswith("cmv-pipeline-")
    assert created[1:] == [("Job", "cmv-clean-t1"), ("Job", "cmv-format-t1"), ("Service", "cmv-train-t1"),
                           ("Job", "cmv-train-t1"), ("Job", "cmv-generate-t1"), ("Job", "cmv-judge-t1")]
    # Waiting: no stage's Job was created before the previous stage's Job had finished.
    for before, after in zip(STAGES, STAGES[1:]):
        assert fake.created_at("Job", f"cmv-{after}-t1") >= fake.finished_at(f"cmv-{before}-t1")
    # Logs streamed from each stage's pod, and the report's place printed at the end.
    for stage in STAGES:
        assert f"] {stage} says hello" in out
    assert out.rstrip().endswith(f"report: {fake.store}/t1/judge/report.md")
    # The namespace of the kubeconfig's context was used.
    assert [c.path for c in fake.calls if "/namespaces/cmv-test/" not in c.path and c.path != "/version"] == []


def test_failure_stops_the_run_and_reports_the_pods_last_lines(fake, capsys):
    fake.scripts["train"] = Script(succeed=False, log=[f"step {i}" for i in range(200)] + ["RuntimeError: CUDA out of memory"])
    assert submit(fake, "--tail", "5") == 1
    out = capsys.readouterr().out
    report = out[out.index("stage train FAILED"):]
    assert "Job cmv-train-t1: BackoffLimitExceeded" in report
    assert "last 5 log lines of pod cmv-train-t1-0-" in report
    lines = report.splitlines()
    tail = lines[lines.index(next(ln for ln in lines if ln.startswith("--- last 5"))) + 1:][:5]
    assert tail == ["step 196", "step 197", "step 198", "step 199", "RuntimeError: CUDA out of memory"]
    assert "resume from train" in report
    # Nothing after the failed stage was started.
    assert ("Job", "cmv-generate-t1") not in fake.created() and ("Job", "cmv-judge-t1") not in fake.created()


def test_resume_starts_at_the_first_stage_without_success(fake, capsys):
    fake.scripts["generate"] = Script(succeed=False, log=["boom"])
    assert submit(fake) == 1
    fake.scripts["generate"] = Script(log=["fixed"])
    first = len(fake.calls)
    assert submit(fake) == 0
    out = capsys.readouterr().out
    again = [(c.kind, c.name) for c in fake.calls[first:] if c.method == "POST" and c.kind == "Job"]
    assert again == [("Job", "cmv-generate-t1"), ("Job", "cmv-judge-t1")]
    assert fake.deleted() == ["cmv-generate-t1"]  # the failed Job's name is needed again
    for stage in ("clean", "format", "train"):
        assert f"=== {stage}: done (_SUCCESS present), skipped" in out
    assert (fake.store / "t1" / "judge" / "_SUCCESS").exists()


def test_resume_trusts_the_jobs_when_the_store_is_not_checked(fake, capsys):
    fake.scripts["judge"] = Script(succeed=False)
    assert submit(fake, "--no-store-check") == 1
    fake.scripts["judge"] = Script()
    first = len(fake.calls)
    assert submit(fake, "--no-store-check") == 0
    again = [c.name for c in fake.calls[first:] if c.method == "POST" and c.kind == "Job"]
    assert again == ["cmv-judge-t1"]
    assert "=== train: done (Job completed), skipped" in capsys.readouterr().out


def test_a_stage_whose_job_is_running_is_waited_for_not_recreated(fake, capsys):
    fake.scripts["clean"] = Script(run_s=1.0, log=["slow clean"])
    # Someone applied the clean stage by hand (kubectl apply -k k8s/overlays/gpu/clean) just before.
    from cmv_core import k8s

    run = k8s.plan(k8s.render_objects("gpu", settings={"RUN_ID": "t1", "ARTIFACT_ROOT": str(fake.store)}))
    cluster = k8s.connect()
    k8s.create_object(cluster, run.config)
    k8s.create_object(cluster, run.job("clean"))
    assert submit(fake, "--stages", "clean", "format") == 0
    out = capsys.readouterr().out
    assert "=== clean: Job cmv-clean-t1 already running, waiting for it" in out
    assert [n for k, n in fake.created("Job")] == ["cmv-clean-t1", "cmv-format-t1"]
    assert fake.created_at("Job", "cmv-format-t1") >= fake.finished_at("cmv-clean-t1")


def test_two_runs_side_by_side(fake):
    assert submit(fake, run_id="a1", overlay="dev") == 0
    assert submit(fake, run_id="b2", overlay="dev") == 0
    jobs = [n for k, n in fake.created("Job")]
    assert jobs == [f"cmv-{s}-a1" for s in STAGES] + [f"cmv-{s}-b2" for s in STAGES]
    assert not fake.deleted()


def test_multinode_train_waits_for_all_its_pods(fake, capsys):
    fake.scripts["train"] = Script(log=["rank {index} finished"])
    assert submit(fake, "--stages", "train", "--nodes", "3", "--setting", "INPUT_WAIT_S=5", overlay="multinode") == 0
    out = capsys.readouterr().out
    for index in range(3):
        assert f"rank {index} finished" in out


def test_status_shows_each_stage(fake, capsys):
    fake.scripts["format"] = Script(succeed=False)
    assert submit(fake) == 1
    capsys.readouterr()
    assert cli.main(["k8s", "status", "--overlay", "gpu", "--run-id", "t1", "--artifact-root", str(fake.store)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["clean"][1:4] == ["cmv-clean-t1", "succeeded", "yes"]
    assert rows["format"][1:4] == ["cmv-format-t1", "failed", "no"]
    assert rows["train"][1:4] == ["cmv-train-t1", "absent", "no"]
