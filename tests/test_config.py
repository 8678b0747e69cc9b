"""Recipes: every shipped config loads, every stage section builds its dataclass, typos are errors."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from cmv_core import config, stages

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
    # every section a recipe may have, through the same check the stages run (cmv_core/stages.py)
    for stage in stages.PIPELINE:
        module_name, cls_name = stage.config.split(":")
        module = importlib.import_module(module_name)
        cfg = config.section(recipe, stage.name, getattr(module, cls_name))
        assert dataclasses.is_dataclass(cfg)


def test_override_into_empty_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: x\ntrain:\n")
    assert config.load_recipe(str(p), ["train.max_steps=3"])["train"] == {"max_steps": 3}
