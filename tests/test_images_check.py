"""make images-check: each stage image's requirement set resolves for its Python and platform (images/images_check.py).

The resolutions ask PyPI (pip --dry-run, wheels only): slow tier, minutes the first time, pip's cache after.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cmv_core import stages

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
sys.path.insert(0, str(IMAGES))
import images_check  # noqa: E402


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(IMAGES / "images_check.py"), *args], capture_output=True, text=True, timeout=1500
    )


def test_every_stage_has_its_python_and_platform():
    assert set(images_check.IMAGES) == set(stages.COMMANDS)
    assert images_check.image_python("judge") == "3.11"  # python:3.11.x-slim
    assert images_check.image_python("generate") == "3.12"  # vLLM's image
    tags = images_check.platform_tags("generate")
    assert tags[0] == "manylinux_2_35_x86_64" and "manylinux_2_17_x86_64" in tags
    # generate also resolves the vLLM release its base image holds
    tag = images_check.dockerfile_arg("generate", "VLLM_IMAGE").rsplit(":v", 1)[1]
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"vllm=={tag}" in images_check.image_requirements("generate", pyproject)
    assert pyproject["project"]["optional-dependencies"]["vllm"] == [f"vllm=={tag}"]  # one vLLM version


def test_stand_in_wheel_carries_the_installed_version_and_requirements(tmp_path):
    from importlib import metadata

    wheel = images_check.stand_in_wheel("torch", tmp_path)
    with zipfile.ZipFile(wheel) as z:
        meta = next(z.read(n).decode() for n in z.namelist() if n.endswith("METADATA"))
    assert f"Version: {metadata.version('torch')}" in meta
    assert all(f"Requires-Dist: {r}" in meta for r in metadata.requires("torch") or [])


@pytest.mark.slow
def test_every_image_resolves():
    proc = run_check()
    assert proc.returncode == 0, proc.stderr
    for image in stages.COMMANDS:
        assert re.search(rf"images-check: {image} \(Python 3\.\d+\): \d+ packages resolve", proc.stdout), proc.stdout
    # the generate image resolves vLLM with the transformers every other image pins
    pinned = re.search(r"^transformers==(\S+)$", (IMAGES / "constraints.txt").read_text(), re.M).group(1)
    assert f"transformers {pinned}, torch 2.13.0" in proc.stdout and "vllm " in proc.stdout


@pytest.mark.slow
def test_a_planted_conflict_fails_naming_the_packages(tmp_path):
    """transformers 5.24.0 (the pin before vLLM 0.32 was chosen) cannot go with vLLM 0.32 (<5.20)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    constraints = (IMAGES / "constraints.txt").read_text()
    pin = re.search(r"^transformers==(\S+)$", constraints, re.M).group(1)
    (tmp_path / "pyproject.toml").write_text(pyproject.replace(f"transformers=={pin}", "transformers==5.24.0"))
    (tmp_path / "constraints.txt").write_text(constraints.replace(f"transformers=={pin}", "transformers==5.24.0"))
    proc = run_check(
        "generate", "--pyproject", str(tmp_path / "pyproject.toml"), "--constraints", str(tmp_path / "constraints.txt")
    )
    assert proc.returncode == 1
    assert "images-check: generate: the requirement set does not resolve" in proc.stderr
    assert "transformers" in proc.stderr and "vllm" in proc.stderr, proc.stderr
