"""Resolve each stage image's requirement set as its build would, without building it: ``make images-check``.

For every image: the core dependencies + its stage extra (images/pyproject_deps.py) under
images/constraints.txt, and for generate the vLLM release of its base image (``VLLM_IMAGE``'s tag), resolved by
``pip install --dry-run --report`` for the image's Python version and platform (``--python-version``,
``--platform``, ``--only-binary=:all:``). A conflict fails with the image and the packages pip names.

Two packages do not come from PyPI wheels in the images: torch (the CUDA base image's, or the CPU index's) and
DeepSpeed (an sdist, built in the train image). pip cannot build an sdist for another platform, and the CUDA
torch wheel is gigabytes, so both enter the resolution as local stand-in wheels carrying the version and the
``Requires-Dist`` of the installed distribution (this interpreter's): their dependencies are still resolved.

    python images/images_check.py                    # every image; exit 1 naming the conflicts
    python images/images_check.py generate --constraints /tmp/planted.txt
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pyproject_deps  # noqa: E402  (a script beside this one, standard library only)

IMAGES = ("clean", "format", "train", "generate", "judge")
# glibc of each base: python:*-slim-bookworm (Debian 12) 2.36; PyTorch's and vLLM's CUDA images (Ubuntu 22.04) 2.35
BASE_GLIBC = {"train": 35, "generate": 35}
DEBIAN_GLIBC = 36


def platform_tags(image: str) -> list[str]:
    """pip matches --platform tags exactly: a glibc 2.N system installs every manylinux wheel up to 2.N."""
    newest = BASE_GLIBC.get(image, DEBIAN_GLIBC)
    return [f"manylinux_2_{minor}_x86_64" for minor in range(newest, 16, -1)] + ["manylinux2014_x86_64"]


# The Python of the bases that are not python:<version> images: PyTorch's CUDA images and vLLM's ship 3.11 / 3.12.
BASE_PYTHON = {"train": "3.11", "generate": "3.12"}
# Not PyPI wheels in the images (module docstring): resolved through stand-ins of the installed versions.
STAND_INS = ("torch", "deepspeed")


def dockerfile_arg(image: str, name: str) -> str | None:
    for line in (HERE / f"{image}.Dockerfile").read_text().splitlines():
        match = re.match(rf"\s*ARG\s+{name}=(\S+)", line)
        if match:
            return match.group(1)
    return None


def image_python(image: str) -> str:
    base = dockerfile_arg(image, "PYTHON_IMAGE")
    match = re.match(r"python:(\d+\.\d+)", base or "")
    return match.group(1) if match else BASE_PYTHON[image]


def image_requirements(image: str, pyproject: dict) -> list[str]:
    reqs = pyproject_deps.requirements(pyproject, image)
    if image == "generate":
        tag = (dockerfile_arg("generate", "VLLM_IMAGE") or "").split("@", 1)[0].rsplit(":v", 1)[-1]
        if not re.fullmatch(r"\d+\.\d+\.\d+", tag):
            raise SystemExit(f"images/generate.Dockerfile: VLLM_IMAGE has no vX.Y.Z tag: {tag!r}")
        reqs.append(f"vllm=={tag}")  # the base image holds this release and what it resolved
    return reqs


def stand_in_wheel(name: str, out: Path) -> Path:
    """A py3-none-any wheel of the installed ``name``: its version and Requires-Dist, no code."""
    dist = metadata.distribution(name)
    version = dist.version
    stem = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in dist.requires or []]
    files = {
        f"{stem}.dist-info/METADATA": "\n".join(lines) + "\n",
        f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: images_check\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{stem}.dist-info/RECORD,,")
    files[f"{stem}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = out / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def conflict_lines(stderr: str) -> list[str]:
    """What pip names: the packages whose requirements clash, or the one it cannot find."""
    keep = []
    for line in stderr.splitlines():
        text = line.strip()
        if text.startswith("WARNING:"):
            continue
        if re.search(r"depends on|user requested|No matching distribution|Cannot install|conflict", text):
            keep.append(text)
    return keep or [line for line in stderr.splitlines() if line.startswith("ERROR")][-5:]


def resolve(image: str, reqs: list[str], constraints: Path, stand_ins: Path, report: Path) -> tuple[bool, list[str]]:
    """(resolved, the conflicts pip names) for one image's requirement set."""
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--report", str(report), "--target", str(report.parent / "target"),
        "--python-version", image_python(image), "--only-binary=:all:",
        *(f"--platform={tag}" for tag in platform_tags(image)),
        "--find-links", str(stand_ins), "-c", str(constraints), *reqs,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, ([] if proc.returncode == 0 else conflict_lines(proc.stderr))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", default=list(IMAGES), help=f"default: all ({', '.join(IMAGES)})")
    parser.add_argument("--constraints", default=str(HERE / "constraints.txt"))
    parser.add_argument("--pyproject", default=str(HERE.parent / "pyproject.toml"))
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(Path(args.pyproject).read_text())
    failed = []
    with tempfile.TemporaryDirectory(prefix="images-check-") as tmp:
        stand_ins = Path(tmp) / "wheels"
        stand_ins.mkdir()
        for name in STAND_INS:
            stand_in_wheel(name, stand_ins)
        for image in args.images:
            report = Path(tmp) / image / "report.json"
            report.parent.mkdir()
            ok, conflicts = resolve(
                image, image_requirements(image, pyproject), Path(args.constraints), stand_ins, report
            )
            if ok:
                got = {
                    i["metadata"]["name"].lower(): i["metadata"]["version"]
                    for i in json.loads(report.read_text())["install"]
                }
                versions = ", ".join(f"{n} {got[n]}" for n in ("transformers", "torch", "vllm") if n in got)
                print(f"images-check: {image} (Python {image_python(image)}): {len(got)} packages resolve ({versions})")
            else:
                failed.append(image)
                print(f"images-check: {image}: the requirement set does not resolve:", file=sys.stderr)
                for line in conflicts:
                    print(f"  {line}", file=sys.stderr)
    if failed:
        print(f"images-check: conflicts in {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
