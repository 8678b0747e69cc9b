"""Recipes: every shipped config loads, every stage section builds its dataclass, typos are errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cmv_core import config, errors

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_overrides_and_unknown_keys(tmp_path):
    @dataclasses.dataclass
    class Cfg:
        steps: int = 1
        lr: float = 1e-4
        name: str = "x"

    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: 3\n")
    recipe = config.load_recipe(str(p), ["train.lr=2e-5", "train.name=abc"])
    cfg = config.section(recipe, "train", Cfg)
    assert (cfg.steps, cfg.lr, cfg.name) == (3, 2e-5, "abc")
    with pytest.raises(config.ConfigError, match=r"r.yaml: unknown key\(s\) stpes in section 'train'"):
        config.section(config.load_recipe(str(p), ["train.stpes=4"]), "train", Cfg)
    with pytest.raises(config.ConfigError, match="expected an integer"):
        config.section(config.load_recipe(str(p), ["train.steps=many"]), "train", Cfg)
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load_recipe(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_recipe_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment saying how to run it"
    recipe = config.load_recipe(str(path))
    assert recipe.get("model")
    full_check(recipe)


def full_check(recipe: dict) -> None:
    """Every section through the checks the stages run before any work: ``cmv run``'s
    validate_recipe (unknown sections and keys, types, each config's own __post_init__), then the
    value checks a stage makes when it starts (generate's check_config, judge's _validate)."""
    from cmv_core.generate.config import GenerateConfig, check_config
    from cmv_core.judge import stage as judge_stage
    from cmv_core.judge.config import JudgeConfig

    config.validate_recipe(recipe)
    generate = config.section(recipe, "generate", GenerateConfig)
    # the variants come from the command line (--trained...) when a recipe does not list them
    check_config(dataclasses.replace(generate, variants=generate.variants or [{"name": "base", "model": "m"}]))
    judge_stage._validate(config.section(recipe, "judge", JudgeConfig))


@pytest.mark.parametrize(
    "override, message",
    [
        ("judge.response_format=xml", "response_format"),
        ("judge.criteria=[charm]", "unknown"),
        ("generate.top_p=0", "top_p"),
        ("generate.backend=telepathy", "generate.backend"),
        ("trian.max_steps=1", "unknown section"),
        ("train.max_stpes=1", "unknown key"),
    ],
)
def test_the_full_check_refuses_a_bad_value_in_a_shipped_recipe(override, message):
    with pytest.raises(errors.InputError, match=message):
        full_check(config.load_recipe(str(CONFIGS[0]), [override]))


def test_override_into_empty_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: x\ntrain:\n")
    assert config.load_recipe(str(p), ["train.max_steps=3"])["train"] == {"max_steps": 3}
