"""The helpers of the daemonless image builds, without building: the pip mirror and CA handed to builds as
read-only mounts (images/build_mounts.py), a CPU base's local torch version under the generate image's
version rule, and the make targets' command lines for buildah."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "images"))
import build_mounts  # noqa: E402
import pyproject_deps  # noqa: E402


def test_environment_wins_over_pip_files_and_the_ca_comes_from_the_first_variable_set():
    env = {"PIP_FIND_LINKS": "/wheels", "SSL_CERT_FILE": "/ssl.pem", "REQUESTS_CA_BUNDLE": "/req.pem"}
    files = {"find-links": "/other", "extra-index-url": "file:///opt/pypi/simple", "cert": "/file.pem"}
    values, ca = build_mounts.settings(env, files)
    assert values == {"find-links": "/wheels", "extra-index-url": "file:///opt/pypi/simple"}
    assert ca == "/ssl.pem"
    assert build_mounts.settings({}, {"cert": "/file.pem"}) == ({}, "/file.pem")


def test_pip_conf_and_ca_are_mounted_read_only_with_each_local_mirror(tmp_path):
    wheels, index = tmp_path / "wheels", tmp_path / "pypi" / "simple"
    wheels.mkdir()
    index.mkdir(parents=True)
    ca = tmp_path / "bundle.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    values = {
        "index-url": "https://pypi.example/simple",
        "extra-index-url": f"file://{index} https://mirror.example/simple",
        "find-links": str(wheels),
    }
    out = tmp_path / "pip"
    flags = build_mounts.write(out, values, str(ca))
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert all(f == "-v" for f in flags[::2])
    # the settings directory at pip's site-wide place, then the local index's root (its files are linked
    # from outside simple/) and the wheel directory, each at its own path; remote locations mount nothing
    assert pairs == [f"{out.resolve()}:/etc/xdg/pip:ro", f"{index.parent}:{index.parent}:ro", f"{wheels}:{wheels}:ro"]
    conf = (out / "pip.conf").read_text()
    assert "cert = /etc/xdg/pip/ca.pem" in conf and f"find-links = {wheels}" in conf
    assert (out / "ca.pem").read_text() == ca.read_text()


def test_cli_prints_nothing_when_there_is_nothing_to_pass(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null", "HOME": str(tmp_path), "XDG_CONFIG_DIRS": "/x"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "images" / "build_mounts.py"), str(tmp_path / "pip")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr


def test_a_cpu_bases_local_torch_version_satisfies_the_pin_but_another_version_does_not():
    base = pyproject_deps.pins(["torch==2.13.0+cpu"])
    reqs, conflicts = pyproject_deps.under_base(["torch==2.13.0"], base, {})
    assert reqs == ["torch==2.13.0+cpu"] and conflicts == []
    _, conflicts = pyproject_deps.under_base(["torch==2.12.0"], base, {})
    assert conflicts == ["torch==2.12.0 (the base image has torch==2.13.0+cpu)"]


def test_buildah_builds_with_layers_mounts_and_cpu_bases_and_pushes_with_a_digest_file():
    out = subprocess.run(
        ["make", "-n", "image-generate", "push-generate", "DOCKER=buildah", "IMAGES_CPU=1", "TLS_VERIFY=false"]
        + ["REGISTRY=127.0.0.1:5055", "TAG=t1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    build = next(line for line in out.splitlines() if line.startswith("buildah build"))
    assert "--layers --isolation chroot $(python3 images/build_mounts.py build/images/pip)" in build
    assert "--build-arg CUDA_MAJOR=cpu" in build and "--build-arg VLLM_IMAGE=localhost/cmv-base-torch:" in build
    assert "-f images/generate.Dockerfile -t 127.0.0.1:5055/cmv-generate:t1 --build-arg" in build
    assert (
        "buildah push --tls-verify=false --digestfile build/images/digests/cmv-generate 127.0.0.1:5055/cmv-generate:t1"
        in out
    )
