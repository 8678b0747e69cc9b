"""`cmv k8s status|submit` decide skip, rerun and stale from the `_SUCCESS` manifests that the real stages
write: one `cmv run` of configs/tiny.yaml (every stage, dpo included) per session, then the decisions on its
outputs as they are, after a recipe change, and after a stage's output is deleted. The cluster is the fake
API (tests/fake_k8s_api.py); the store is the run's own directory."""

# The fake API fixture is imported by name from test_k8s_submit; tests take it as a parameter of that name.
# ruff: noqa: F811

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes")

from conftest import CONFIGS, REPO, TINY_RUN_ID  # noqa: E402
from test_k8s_submit import fake  # noqa: E402,F401  (the fake API fixture)

from cmv_core import cli  # noqa: E402
from cmv_core.k8s import api as k8s_api  # noqa: E402
from cmv_core.k8s import render as k8s_render  # noqa: E402
from cmv_core.k8s.submit import status  # noqa: E402

pytestmark = pytest.mark.slow

RUN_ID = TINY_RUN_ID  # conftest.tiny_pipeline_run's
ALL = ["clean", "format", "train", "dpo", "generate", "judge"]
SAMPLE = str(REPO / "cmv_core" / "data" / "sample_cmv.jsonlist")  # what `cmv run` gives clean by default
MODEL = "embedded:tiny-random-llama"  # configs/tiny.yaml's model


@pytest.fixture(scope="module")
def real_run(tiny_pipeline_run) -> Path:
    """<root>/real/<stage>/ as `cmv run` leaves them: the real manifests of every stage (conftest's one run)."""
    root, _ = tiny_pipeline_run
    assert sorted(p.name for p in (root / RUN_ID).iterdir() if (p / "_SUCCESS").is_file()) == sorted(ALL)
    return root


def recipe_with(tmp_path: Path, section: str | None = None, key: str | None = None, value=None) -> str:
    recipe = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    if section is not None:
        assert key in recipe[section], f"{section}.{key} is not set by configs/tiny.yaml"
        recipe[section][key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def settings(root: Path, recipe: str) -> dict[str, str]:
    return {"RUN_ID": RUN_ID, "ARTIFACT_ROOT": str(root), "RAW_INPUT": SAMPLE, "CMV_RECIPE": recipe, "CMV_MODEL": MODEL}


def stage_rows(root: Path, recipe: str) -> dict:
    run = k8s_render.plan(k8s_render.render_objects("gpu", settings=settings(root, recipe), dpo=True))
    return {row.stage: row for row in status(k8s_api.connect(), run)}


def not_done(rows: dict) -> list[str]:
    return [stage for stage, row in rows.items() if not row.done]


def submit(root: Path, recipe: str) -> int:
    args = ["k8s", "submit", "--overlay", "gpu", "--dpo", "--poll", "0.05"]
    return cli.main([*args, *[f"--{k}={v}" for k, v in cli_settings(root, recipe).items()]])


def cli_settings(root: Path, recipe: str) -> dict[str, str]:
    return {"run-id": RUN_ID, "artifact-root": str(root), "raw-input": SAMPLE, "recipe": recipe, "model": MODEL}


def jobs_created(fake) -> list[str]:
    return [name for kind, name in fake.created() if kind == "Job"]


def test_a_finished_run_is_done_and_submit_skips_every_stage(real_run, fake, capsys, tmp_path):
    fake.on_success = None
    recipe = recipe_with(tmp_path)
    rows = stage_rows(real_run, recipe)
    assert list(rows) == ALL
    assert [(r.success, r.stale, r.done) for r in rows.values()] == [(True, None, True)] * len(ALL)
    assert submit(real_run, recipe) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("===")] == [
        f"=== {stage}: done (_SUCCESS matches), skipped" for stage in ALL
    ]
    assert jobs_created(fake) == []


@pytest.mark.parametrize(
    "section, key, value, recorded, stale",
    [
        ("clean", "max_reject_fraction", 0.5, 0.05, ALL),
        ("format", "test_fraction", 0.3, 0.25, ALL[1:]),
        ("train", "max_steps", 3, 4, ["train", "dpo", "generate", "judge"]),
        ("dpo", "max_steps", 1, 2, ["dpo", "generate", "judge"]),
        ("generate", "max_new_tokens", 8, 16, ["generate", "judge"]),
        ("judge", "max_items", 3, 4, ["judge"]),
    ],
)
def test_a_recipe_change_makes_that_stage_and_every_stage_after_it_stale(
    real_run, fake, tmp_path, section, key, value, recorded, stale
):
    rows = stage_rows(real_run, recipe_with(tmp_path, section, key, value))
    assert not_done(rows) == stale
    assert all(rows[s].success for s in ALL)  # every _SUCCESS is there: staleness alone decides
    assert rows[section].stale == f"config changed: {section}.{key}: {recorded!r} -> {value!r}"
    for later in stale[1:]:
        assert rows[later].stale, later


def test_a_deleted_output_is_run_again_with_every_stage_after_it(real_run, fake, tmp_path):
    recipe = recipe_with(tmp_path)
    train = real_run / RUN_ID / "train"
    train.rename(train.with_name("train.gone"))
    try:
        rows = stage_rows(real_run, recipe)
    finally:
        train.with_name("train.gone").rename(train)
    assert not_done(rows) == ["train", "dpo", "generate", "judge"]
    assert (rows["train"].success, rows["train"].stale) == (False, None)
    for reader in ("dpo", "generate"):  # they read train: their manifests name an input that is gone
        assert rows[reader].stale == f"its input {train} has no _SUCCESS any more", reader
    assert rows["judge"].stale == "its input stage generate runs again first"  # reads generate, not train
    assert not_done(stage_rows(real_run, recipe)) == []  # put back: done again


def test_submit_after_a_judge_change_runs_the_judge_job_only(real_run, fake, capsys, tmp_path):
    fake.on_success = None  # the fake Job leaves the store as it is
    assert submit(real_run, recipe_with(tmp_path, "judge", "max_items", 3)) == 0
    out = capsys.readouterr().out
    for stage in ALL[:-1]:
        assert f"=== {stage}: done (_SUCCESS matches), skipped" in out
    assert "=== judge: _SUCCESS present but config changed: judge.max_items: 4 -> 3; running it again" in out
    assert jobs_created(fake) == [f"cmv-judge-{RUN_ID}"]


def test_submit_after_generate_output_is_deleted_runs_generate_then_judge(real_run, fake, capsys, tmp_path):
    fake.on_success = None
    generate = real_run / RUN_ID / "generate"
    shutil.copytree(generate, tmp_path / "generate.bak")
    shutil.rmtree(generate)
    try:
        assert submit(real_run, recipe_with(tmp_path)) == 0
    finally:
        shutil.copytree(tmp_path / "generate.bak", generate)
    out = capsys.readouterr().out
    assert jobs_created(fake) == [f"cmv-generate-{RUN_ID}", f"cmv-judge-{RUN_ID}"]
    assert f"=== judge: _SUCCESS present but its input {generate} has no _SUCCESS any more; running it again" in out
