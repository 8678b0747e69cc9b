"""`cmv k8s submit|status` against a fake Kubernetes API on loopback (tests/fake_k8s_api.py), with the real
`kubernetes` client configured through a kubeconfig: creation order, waiting, failure reports with the
failed pod's last log lines, and resuming a run from its first stage without _SUCCESS."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")

from fake_k8s_api import FakeK8s, Fault, Script, kubeconfig  # noqa: E402

from cmv_core import cli  # noqa: E402
from cmv_core.k8s import api as k8s_api
from cmv_core.k8s import names as k8s_names
from cmv_core.k8s import render as k8s_render
from cmv_core.k8s import settings as k8s_settings

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
        stage, run_id = labels["cmv.io/stage"], labels["cmv.io/run-id"]
        out = store / run_id / stage
        out.mkdir(parents=True, exist_ok=True)
        (out / "_SUCCESS").write_text(json.dumps(fake_manifest(server, job, stage, run_id)))

    server.on_success = write_success
    server.store = store
    yield server
    server.stop()


def fake_manifest(server: FakeK8s, job: dict, stage: str, run_id: str) -> dict:
    """A _SUCCESS as the real stage writes it: its inputs' manifest digests, its resolved config
    (the recipe's values plus defaults the recipe does not set), the time it finished."""
    cm_name = next(
        e["configMapRef"]["name"]
        for e in k8s_names.pod_template(job)["spec"]["containers"][0]["envFrom"]
        if "configMapRef" in e
    )
    values = next(o for (kind, _, name), o in server.objects.items() if kind == "ConfigMap" and name == cm_name)["data"]
    root = Path(values["ARTIFACT_ROOT"])
    args = k8s_names.pod_template(job)["spec"]["containers"][0]["args"]
    # generate given --dpo=... reads the DPO output too (its variant's manifest is an input)
    ups = k8s_names.UPSTREAM[stage] + (["dpo"] if any(a.startswith("--dpo=") for a in args) else [])
    inputs = (
        [{"uri": values["RAW_INPUT"], "digest": "fingerprint:abc"}]
        if stage == "clean"
        else [
            {
                "uri": str(root / run_id / up),
                "digest": "sha256:" + hashlib.sha256((root / run_id / up / "_SUCCESS").read_bytes()).hexdigest(),
            }
            for up in ups
        ]
    )
    recipe = k8s_settings.load_recipe_here(values["CMV_RECIPE"]) or {}
    if stage == "dpo":  # `cmv train --method dpo`: a train manifest, dpo: read over train:, on the SFT model
        assert "--method=dpo" in args and "--init=$(ARTIFACT_ROOT)/$(RUN_ID)/train" in args
        train = {k: v for k, v in (recipe.get("train") or {}).items() if k not in ("packing", "packing_strategy")}
        section = {"a_default_the_recipe_does_not_set": 1, **train, **(recipe.get("dpo") or {})}
        config = {
            "train": section,
            "model": str(root / run_id / "train" / "model"),
            "method": "dpo",
            "init": str(root / run_id / "train"),
            "base_model": values["CMV_MODEL"],
        }
        return {"stage": "train", "run_id": run_id, "inputs": inputs, "config": config, "finished_at": time.time_ns()}
    section = {"a_default_the_recipe_does_not_set": 1, **(recipe.get(stage) or {})}
    config = {stage: section, "model": values["CMV_MODEL"]} if stage in ("format", "train") else section
    return {"stage": stage, "run_id": run_id, "inputs": inputs, "config": config, "finished_at": time.time_ns()}


def submit(fake, *extra: str, run_id: str = "t1", overlay: str = "gpu") -> int:
    return cli.main(
        [
            "k8s",
            "submit",
            "--overlay",
            overlay,
            "--run-id",
            run_id,
            "--artifact-root",
            str(fake.store),
            "--poll",
            "0.05",
            *extra,
        ]
    )


def test_creates_each_stage_after_the_previous_one_finished(fake, capsys):
    for stage in STAGES:
        fake.scripts[stage] = Script(run_s=0.4, log=[f"{stage} says hello", "done"])
    assert submit(fake) == 0
    out = capsys.readouterr().out
    created = fake.created()
    assert created[0][0] == "ConfigMap" and created[0][1].startswith("cmv-pipeline-")
    assert created[1:] == [
        ("Job", "cmv-clean-t1"),
        ("Job", "cmv-format-t1"),
        ("Service", "cmv-train-t1"),
        ("Job", "cmv-train-t1"),
        ("Job", "cmv-generate-t1"),
        ("Job", "cmv-judge-t1"),
    ]
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
    fake.scripts["train"] = Script(
        succeed=False, log=[f"step {i}" for i in range(200)] + ["RuntimeError: CUDA out of memory"]
    )
    assert submit(fake, "--tail", "5") == 1
    out = capsys.readouterr().out
    report = out[out.index("stage train FAILED") :]
    assert "Job cmv-train-t1: BackoffLimitExceeded" in report
    assert "last 5 log lines of pod cmv-train-t1-0-" in report
    lines = report.splitlines()
    tail = lines[lines.index(next(ln for ln in lines if ln.startswith("--- last 5"))) + 1 :][:5]
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
        assert f"=== {stage}: done (_SUCCESS matches), skipped" in out
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
    fake.scripts["clean"] = Script(run_s=1.0, log=["slow clean"], start_when_read=True)
    # Someone applied the clean stage by hand (kubectl apply -k k8s/overlays/gpu/clean) just before.
    run = k8s_render.plan(k8s_render.render_objects("gpu", settings={"RUN_ID": "t1", "ARTIFACT_ROOT": str(fake.store)}))
    cluster = k8s_api.connect()
    k8s_api.create_object(cluster, run.config)
    k8s_api.create_object(cluster, run.job("clean"))
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


def test_status_leaves_the_callers_s3_retries_as_they_were(fake, monkeypatch, capsys):
    # status/submit check the store with 2 attempts (fail fast), for that command only: an in-process
    # caller that goes on (a notebook, the next test) keeps its own retry budget.
    monkeypatch.delenv("CMV_S3_MAX_ATTEMPTS", raising=False)
    assert cli.main(["k8s", "status", "--overlay", "gpu", "--run-id", "t1", "--artifact-root", str(fake.store)]) == 0
    assert "CMV_S3_MAX_ATTEMPTS" not in os.environ


def test_status_shows_each_stage(fake, capsys):
    fake.scripts["format"] = Script(succeed=False)
    assert submit(fake) == 1
    capsys.readouterr()
    assert cli.main(["k8s", "status", "--overlay", "gpu", "--run-id", "t1", "--artifact-root", str(fake.store)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["clean"][1:4] == ["cmv-clean-t1", "succeeded", "yes"]
    assert rows["format"][1:4] == ["cmv-format-t1", "failed", "no"]
    assert rows["train"][1:4] == ["cmv-train-t1", "absent", "no"]


# ---------------------------------------------------------------- the way real clusters fail


def test_a_503_while_waiting_is_retried_and_the_run_finishes(fake, capsys, monkeypatch):
    monkeypatch.setenv("CMV_K8S_BACKOFF_S", "0.05")
    fake.scripts["train"] = Script(run_s=0.6)
    fake.faults.append(Fault("GET", r"/jobs/cmv-train-t1$", 503, times=3))
    fake.faults.append(Fault("GET", r"/pods$", 502, times=1))
    assert submit(fake) == 0
    assert sorted(f[2] for f in fake.injected) == [502, 503, 503, 503]
    assert capsys.readouterr().out.rstrip().endswith("report.md")


def test_an_api_error_after_the_retries_is_one_line_not_a_traceback(fake, capsys, monkeypatch):
    monkeypatch.setenv("CMV_K8S_RETRIES", "1")
    fake.faults.append(Fault("POST", r"/configmaps$", 403, times=5))
    assert submit(fake) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]  # one line
    assert err.startswith("cmv k8s submit: error: API server answered 403") and "injected fault 403" in err
    assert "Traceback" not in err


def test_a_dropped_log_stream_is_reconnected_without_losing_or_doubling_a_line(fake, capsys):
    lines = [f"clean line {i}" for i in range(12)]  # 4 a second: the reconnect's sinceTime second resends some
    fake.scripts["clean"] = Script(run_s=1.0, log=lines)
    fake.drop_log_after = 5
    assert submit(fake, "--stages", "clean") == 0
    out = capsys.readouterr().out
    assert fake.dropped == [name for name in fake.job_pods_of("cmv-clean-t1")]
    printed = [ln.split("] ", 1)[1] for ln in out.splitlines() if ln.startswith("[cmv-clean-t1-")]
    assert printed == lines
    since = [c for c in fake.calls if c.kind == "PodLog"]
    assert len(since) >= 2  # the broken stream, then the reconnect


def write_recipe(path: Path, learning_rate: float) -> str:
    import yaml

    recipe = yaml.safe_load((k8s_names.default_k8s_dir().parent / "configs" / "llama-3.2-1b.yaml").read_text())
    recipe["train"]["learning_rate"] = learning_rate
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_changed_recipe_reruns_the_changed_stage_and_those_after_it(fake, capsys, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", 2.0e-4)
    assert submit(fake, "--recipe", recipe) == 0
    first_report = (fake.store / "t1" / "judge" / "_SUCCESS").read_bytes()
    capsys.readouterr()
    write_recipe(tmp_path / "recipe.yaml", 1.0e-4)  # same path, another train.learning_rate
    start = len(fake.calls)
    assert submit(fake, "--recipe", recipe) == 0
    out = capsys.readouterr().out
    assert "=== clean: done (_SUCCESS matches), skipped" in out
    assert "=== format: done (_SUCCESS matches), skipped" in out
    assert (
        "=== train: _SUCCESS present but config changed: train.learning_rate: 0.0002 -> 0.0001; running it again" in out
    )
    # generate and judge read what train and generate wrote: their inputs changed, so they run again too
    assert (
        "=== generate: _SUCCESS present but its input " in out and "=== judge: _SUCCESS present but its input " in out
    )
    again = [c.name for c in fake.calls[start:] if c.method == "POST" and c.kind == "Job"]
    assert again == ["cmv-train-t1", "cmv-generate-t1", "cmv-judge-t1"]
    assert (fake.store / "t1" / "judge" / "_SUCCESS").read_bytes() != first_report
    # The old Jobs were deleted in the foreground, and each new one created only once the old pods were gone.
    assert [b.get("propagationPolicy") for b in fake.delete_bodies] == ["Foreground"] * 3
    for name in again:
        deletes = [c.t for c in fake.calls[start:] if c.method == "DELETE" and c.name == name]
        pod_lists = [c.t for c in fake.calls[start:] if c.kind == "Pod" and c.name.endswith(f"={name}")]
        created = max(c.t for c in fake.calls[start:] if c.method == "POST" and c.name == name)
        assert deletes and created - deletes[0] >= fake.delete_delay_s
        assert any(deletes[0] < t < created for t in pod_lists)  # it looked before creating
    # A third submit with the same recipe skips everything.
    start = len(fake.calls)
    assert submit(fake, "--recipe", recipe) == 0
    assert not [c for c in fake.calls[start:] if c.method == "POST" and c.kind == "Job"]


def test_a_409_with_another_settings_hash_is_an_error_naming_both(fake, capsys, tmp_path):
    fake.scripts["train"] = Script(run_s=30)
    first = k8s_render.plan(
        k8s_render.render_objects(
            "gpu",
            settings={
                "RUN_ID": "t1",
                "ARTIFACT_ROOT": str(fake.store),
                "CMV_RECIPE": write_recipe(tmp_path / "a.yaml", 2.0e-4),
            },
        )
    )
    cluster = k8s_api.connect()
    k8s_api.create_object(cluster, first.config)
    assert k8s_api.create_object(cluster, first.job("train"))
    assert not k8s_api.create_object(cluster, first.job("train"))  # same settings: adopted, not an error
    theirs = first.job("train")["metadata"]["annotations"][k8s_names.SETTINGS_ANNOTATION][:16]
    second = k8s_render.plan(
        k8s_render.render_objects(
            "gpu",
            settings={
                "RUN_ID": "t1",
                "ARTIFACT_ROOT": str(fake.store),
                "CMV_RECIPE": write_recipe(tmp_path / "b.yaml", 1.0e-4),
            },
        )
    )
    ours = second.job("train")["metadata"]["annotations"][k8s_names.SETTINGS_ANNOTATION][:16]
    assert ours != theirs
    with pytest.raises(k8s_names.SettingsConflict, match=f"settings hash {theirs}, this submit's is {ours}"):
        k8s_api.create_object(cluster, second.job("train"))
    # Through the CLI: the running Job is not adopted by a submit with other settings, nor deleted.
    start = len(fake.calls)
    assert submit(fake, "--stages", "train", "--recipe", str(tmp_path / "b.yaml")) == 2
    err = capsys.readouterr().err
    assert f"Job cmv-train-t1 exists with other settings (settings hash {theirs}, this submit's is {ours})" in err
    assert not [c for c in fake.calls[start:] if c.kind == "Job" and c.method in ("POST", "DELETE")]


def test_every_job_carries_its_settings_hash_and_only_its_stage_changes_it(tmp_path):
    def hashes(lr: float) -> dict[str, str]:
        run = k8s_render.plan(
            k8s_render.render_objects(
                "gpu", settings={"RUN_ID": "h1", "CMV_RECIPE": write_recipe(tmp_path / f"{lr}.yaml", lr)}
            )
        )
        out = {}
        for stage in STAGES:
            job = run.job(stage)
            digest = job["metadata"]["annotations"][k8s_names.SETTINGS_ANNOTATION]
            assert job["metadata"]["labels"][k8s_names.SETTINGS_LABEL] == digest[:16]
            assert job["spec"]["template"]["metadata"]["labels"][k8s_names.SETTINGS_LABEL] == digest[:16]
            out[stage] = digest
        return out

    a, b = hashes(2.0e-4), hashes(1.0e-4)
    assert [s for s in STAGES if a[s] != b[s]] == ["train"]


def test_jobset_overlay_runs_train_as_a_jobset_and_owns_what_it_uses(fake, capsys):
    fake.scripts["train"] = Script(log=["rank {index} finished"])
    assert submit(fake, "--nodes", "3", overlay="jobset") == 0
    out = capsys.readouterr().out
    assert [k for k, n in fake.created() if n == "cmv-train-t1"] == ["JobSet"]  # no Service: JobSet makes its own
    assert "=== train: JobSet cmv-train-t1 succeeded" in out
    for index in range(3):
        assert f"rank {index} finished" in out
    # Nothing outlives the run: the ConfigMap is owned by every stage's workload, so it goes with the last one.
    config = next(o for (kind, _, name), o in fake.objects.items() if kind == "ConfigMap")
    owners = {(r["kind"], r["name"]) for r in config["metadata"]["ownerReferences"]}
    assert owners == {("Job", f"cmv-{s}-t1") for s in STAGES if s != "train"} | {("JobSet", "cmv-train-t1")}


def test_the_train_service_is_owned_by_the_train_job(fake):
    assert submit(fake, "--stages", "train", "--setting", "INPUT_WAIT_S=5") == 0
    service = fake.objects[("Service", "cmv-test", "cmv-train-t1")]
    job = fake.objects[("Job", "cmv-test", "cmv-train-t1")]
    assert service["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "cmv-train-t1",
            "uid": job["metadata"]["uid"],
            "blockOwnerDeletion": False,
        }
    ]


def test_jobs_applied_from_cmv_k8s_render_are_adopted_by_submit(fake, capsys):
    import yaml

    fake.scripts["clean"] = Script(run_s=1.0, log=["applied by hand"], start_when_read=True)
    text = k8s_render.render("gpu", stage="clean", settings={"RUN_ID": "t1", "ARTIFACT_ROOT": str(fake.store)})
    docs = [d for d in yaml.safe_load_all(text) if d]
    job = next(d for d in docs if d["kind"] == "Job")
    assert k8s_names.SETTINGS_ANNOTATION in job["metadata"]["annotations"]  # render | kubectl apply -f - carries it
    cluster = k8s_api.connect()
    for doc in docs:
        k8s_api.create_object(cluster, doc)
    assert submit(fake, "--stages", "clean") == 0
    assert "=== clean: Job cmv-clean-t1 already running, waiting for it" in capsys.readouterr().out
    assert [n for _, n in fake.created("Job")] == ["cmv-clean-t1"]


# ---------------------------------------------------------------- the optional dpo stage (k8s/components/dpo)

DPO_PIPELINE = ["clean", "format", "train", "dpo", "generate", "judge"]


def write_dpo_recipe(path: Path, dpo_learning_rate: float, train_learning_rate: float = 2.0e-4, **dpo) -> str:
    import yaml

    recipe = yaml.safe_load((k8s_names.default_k8s_dir().parent / "configs" / "llama-3.2-1b.yaml").read_text())
    recipe["train"]["learning_rate"] = train_learning_rate
    recipe["dpo"].update(learning_rate=dpo_learning_rate, **dpo)
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def jobs_posted(fake, start: int = 0) -> list[str]:
    return [c.name for c in fake.calls[start:] if c.method == "POST" and c.kind == "Job"]


def test_a_dpo_run_creates_and_waits_for_each_stage_in_order_dpo_between_train_and_generate(fake, capsys, tmp_path):
    recipe = write_dpo_recipe(tmp_path / "recipe.yaml", 5.0e-6)
    for stage in DPO_PIPELINE:
        fake.scripts[stage] = Script(run_s=0.4, log=[f"{stage} says hello", "done"])
    assert submit(fake, "--dpo", "--recipe", recipe) == 0
    out = capsys.readouterr().out
    assert fake.created()[1:] == [
        ("Job", "cmv-clean-t1"),
        ("Job", "cmv-format-t1"),
        ("Service", "cmv-train-t1"),
        ("Job", "cmv-train-t1"),
        ("Service", "cmv-dpo-t1"),
        ("Job", "cmv-dpo-t1"),
        ("Job", "cmv-generate-t1"),
        ("Job", "cmv-judge-t1"),
    ]
    # dpo starts once train has finished, and generate only once dpo has
    for before, after in zip(DPO_PIPELINE, DPO_PIPELINE[1:]):
        assert fake.created_at("Job", f"cmv-{after}-t1") >= fake.finished_at(f"cmv-{before}-t1")
    assert "] dpo says hello" in out and "=== dpo: Job cmv-dpo-t1 succeeded" in out
    dpo = fake.objects[("Job", "cmv-test", "cmv-dpo-t1")]
    assert k8s_names.pod_template(dpo)["spec"]["containers"][0]["image"].split("/")[-1].startswith("cmv-train:")
    generate = fake.objects[("Job", "cmv-test", "cmv-generate-t1")]
    assert "--dpo=$(ARTIFACT_ROOT)/$(RUN_ID)/dpo" in k8s_names.pod_template(generate)["spec"]["containers"][0]["args"]
    # the dpo Job owns its headless Service and (with the others) the run's ConfigMap
    service = fake.objects[("Service", "cmv-test", "cmv-dpo-t1")]
    assert [r["name"] for r in service["metadata"]["ownerReferences"]] == ["cmv-dpo-t1"]
    config = next(o for (kind, _, name), o in fake.objects.items() if kind == "ConfigMap")
    assert {r["name"] for r in config["metadata"]["ownerReferences"]} == {f"cmv-{s}-t1" for s in DPO_PIPELINE}
    assert json.loads((fake.store / "t1" / "dpo" / "_SUCCESS").read_text())["stage"] == "train"
    assert out.rstrip().endswith(f"report: {fake.store}/t1/judge/report.md")
    # status has the dpo row, after train
    assert (
        cli.main(
            [
                "k8s",
                "status",
                "--overlay",
                "gpu",
                "--run-id",
                "t1",
                "--artifact-root",
                str(fake.store),
                "--recipe",
                recipe,
                "--dpo",
            ]
        )
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == DPO_PIPELINE
    assert rows[3][1:4] == ["cmv-dpo-t1", "succeeded", "yes"]


def test_a_dpo_run_skips_dpo_when_unchanged_and_reruns_dpo_generate_judge_when_only_dpo_changed(fake, capsys, tmp_path):
    recipe = write_dpo_recipe(tmp_path / "recipe.yaml", 5.0e-6)
    assert submit(fake, "--dpo", "--recipe", recipe) == 0
    first_dpo = (fake.store / "t1" / "dpo" / "_SUCCESS").read_bytes()
    capsys.readouterr()
    # Unchanged: every stage, dpo included, is done.
    start = len(fake.calls)
    assert submit(fake, "--dpo", "--recipe", recipe) == 0
    out = capsys.readouterr().out
    for stage in DPO_PIPELINE:
        assert f"=== {stage}: done (_SUCCESS matches), skipped" in out
    assert jobs_posted(fake, start) == [] and fake.deleted() == []
    # Only the dpo: section changed: dpo reruns, and generate and judge (they read its output); not the others.
    write_dpo_recipe(tmp_path / "recipe.yaml", 1.0e-5)
    start = len(fake.calls)
    assert submit(fake, "--dpo", "--recipe", recipe) == 0
    out = capsys.readouterr().out
    for stage in ("clean", "format", "train"):
        assert f"=== {stage}: done (_SUCCESS matches), skipped" in out
    assert "=== dpo: _SUCCESS present but config changed: dpo.learning_rate: 5e-06 -> 1e-05; running it again" in out
    assert "=== generate: _SUCCESS present but its input " in out and "/t1/dpo changed since" in out
    assert jobs_posted(fake, start) == ["cmv-dpo-t1", "cmv-generate-t1", "cmv-judge-t1"]
    assert fake.deleted() == ["cmv-dpo-t1", "cmv-generate-t1", "cmv-judge-t1"]
    assert (fake.store / "t1" / "dpo" / "_SUCCESS").read_bytes() != first_dpo
    # A dpo: key the train stage does not read leaves train alone, and a train: change reaches dpo (read over it).
    write_dpo_recipe(tmp_path / "recipe.yaml", 1.0e-5, train_learning_rate=1.0e-4)
    start = len(fake.calls)
    assert submit(fake, "--dpo", "--recipe", recipe) == 0
    assert jobs_posted(fake, start) == ["cmv-train-t1", "cmv-dpo-t1", "cmv-generate-t1", "cmv-judge-t1"]


def test_a_failed_dpo_stops_before_generate_and_a_resubmit_resumes_from_dpo(fake, capsys, tmp_path):
    recipe = write_dpo_recipe(tmp_path / "recipe.yaml", 5.0e-6)
    fake.scripts["dpo"] = Script(succeed=False, log=["rank {index}: NCCL timeout"])
    assert submit(fake, "--dpo", "--recipe", recipe, "--nodes", "2", overlay="multinode") == 1
    out = capsys.readouterr().out
    assert "stage dpo FAILED: Job cmv-dpo-t1: BackoffLimitExceeded" in out and "resume from dpo" in out
    assert len(fake.job_pods_of("cmv-dpo-t1")) == 2  # multi-node like train: NNODES pods
    assert jobs_posted(fake) == ["cmv-clean-t1", "cmv-format-t1", "cmv-train-t1", "cmv-dpo-t1"]
    fake.scripts["dpo"] = Script(log=["fixed"])
    start = len(fake.calls)
    assert submit(fake, "--dpo", "--recipe", recipe, "--nodes", "2", overlay="multinode") == 0
    out = capsys.readouterr().out
    assert "=== train: done (_SUCCESS matches), skipped" in out
    assert jobs_posted(fake, start) == ["cmv-dpo-t1", "cmv-generate-t1", "cmv-judge-t1"]
    assert fake.deleted() == ["cmv-dpo-t1"]
    # The store unreachable from here (--no-store-check): the completed dpo Job, same settings hash, is done.
    start = len(fake.calls)
    assert submit(fake, "--dpo", "--recipe", recipe, "--nodes", "2", "--no-store-check", overlay="multinode") == 0
    assert "=== dpo: done (Job completed), skipped" in capsys.readouterr().out
    assert jobs_posted(fake, start) == []


def test_a_run_without_dpo_ignores_the_dpo_section_and_refuses_stages_dpo(fake, capsys, tmp_path):
    recipe = write_dpo_recipe(tmp_path / "recipe.yaml", 5.0e-6)
    assert submit(fake, "--recipe", recipe, "--stages", "clean") == 0
    write_dpo_recipe(tmp_path / "recipe.yaml", 1.0e-5)  # no stage of this run reads dpo:
    start = len(fake.calls)
    assert submit(fake, "--recipe", recipe, "--stages", "clean", "--no-store-check") == 0
    assert jobs_posted(fake, start) == []
    capsys.readouterr()
    assert submit(fake, "--recipe", recipe, "--stages", "dpo") == 2
    assert "--stages dpo: not a stage of this run (dpo: render it with --dpo)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, overlay, says",
    [
        ("jobset", "jobset", "the jobset overlay trains on a JobSet"),
        ("argo", "jobset", "--engine argo has no dpo step"),
        ("disabled", "gpu", "has no dpo: section, or its dpo.enabled is false"),
    ],
)
def test_dpo_where_it_cannot_run_is_a_one_line_error_and_creates_nothing(fake, capsys, tmp_path, case, overlay, says):
    extra = {
        "jobset": [],
        "argo": ["--engine", "argo"],
        "disabled": ["--recipe", write_dpo_recipe(tmp_path / "off.yaml", 5.0e-6, enabled=False)],
    }[case]
    assert submit(fake, "--dpo", *extra, overlay=overlay) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("cmv k8s submit: error: ") and says in err
    assert fake.created() == []


def test_the_dpo_jobs_settings_hash_follows_the_train_and_dpo_sections_and_no_other_stages_does(tmp_path):
    def hashes(name: str, dpo_lr: float, train_lr: float) -> dict[str, str]:
        recipe = write_dpo_recipe(tmp_path / f"{name}.yaml", dpo_lr, train_learning_rate=train_lr)
        run = k8s_render.plan(
            k8s_render.render_objects("gpu", settings={"RUN_ID": "h1", "CMV_RECIPE": recipe}, dpo=True)
        )
        assert run.order == DPO_PIPELINE
        return {s: run.job(s)["metadata"]["annotations"][k8s_names.SETTINGS_ANNOTATION] for s in run.order}

    a, b, c = hashes("a", 5.0e-6, 2.0e-4), hashes("b", 1.0e-5, 2.0e-4), hashes("c", 5.0e-6, 1.0e-4)
    assert [s for s in DPO_PIPELINE if a[s] != b[s]] == ["dpo"]
    assert [s for s in DPO_PIPELINE if a[s] != c[s]] == ["train", "dpo"]
