"""The host's pip mirror and CA bundle, handed to image builds as read-only mounts (never a layer).

A build behind a TLS-intercepting proxy needs the proxy's CA; a build on an air-gapped machine needs the
mirror or wheel directory that the host's pip uses (here: the CPU torch wheel lies in a local directory).
This writes ``<dir>/pip.conf`` (index-url, extra-index-url, find-links, cert) and a copy of the CA bundle
next to it, and prints the build flags that mount them, and each local mirror directory, read-only:

    python3 images/build_mounts.py build/images/pip
    # -> -v /abs/build/images/pip:/etc/xdg/pip:ro -v /opt/wheels:/opt/wheels:ro ...

pip in the build reads /etc/xdg/pip/pip.conf (its site-wide file). Settings come from the environment
(PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS; the CA from PIP_CERT, SSL_CERT_FILE or
REQUESTS_CA_BUNDLE), else from the host's pip configuration files. Nothing is printed when there is
nothing to pass. Standard library and the host's pip only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

MOUNT_POINT = "/etc/xdg/pip"
SETTINGS = {  # pip.conf key -> environment variable
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
}
CA_VARIABLES = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def pip_config_files() -> dict[str, str]:
    """``global.<key>`` values from the host's pip configuration files (not the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CONFIG_FILE"}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, env=env, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.partition(".")
        if section in ("global", "install") and value:
            values.setdefault(name, value.strip().strip("'\""))
    return values


def local_path(location: str) -> str | None:
    """The directory a file:// URL or a plain path names (None for http(s) locations)."""
    if location.startswith("file://"):
        return urlparse(location).path
    if "://" not in location:
        return location
    return None


def mount_root(path: str) -> str:
    """The directory to mount for a local index: a file:///x/simple index links to files under /x."""
    p = Path(path)
    return str(p.parent if p.name == "simple" else p)


def settings(environ: dict[str, str], files: dict[str, str]) -> tuple[dict[str, str], str | None]:
    values = {key: environ.get(var) or files.get(key, "") for key, var in SETTINGS.items()}
    ca = next((environ[v] for v in CA_VARIABLES if environ.get(v)), None) or files.get("cert") or None
    return {k: v for k, v in values.items() if v}, ca


def write(out_dir: Path, values: dict[str, str], ca: str | None) -> list[str]:
    """Write pip.conf (and ca.pem), return the mount flags."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[global]"] + [f"{k} = {v}" for k, v in values.items()]
    if ca:
        shutil.copyfile(ca, out_dir / "ca.pem")
        lines.append(f"cert = {MOUNT_POINT}/ca.pem")
    (out_dir / "pip.conf").write_text("\n".join(lines) + "\n")
    flags = ["-v", f"{out_dir.resolve()}:{MOUNT_POINT}:ro"]
    mounted = set()
    for key in ("index-url", "extra-index-url", "find-links"):
        for location in values.get(key, "").split():
            path = local_path(location)
            if path and Path(path).is_dir():
                root = mount_root(path)
                if root not in mounted:
                    mounted.add(root)
                    flags += ["-v", f"{root}:{root}:ro"]
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where pip.conf and ca.pem are written (outside the build context)")
    args = parser.parse_args(argv)
    values, ca = settings(dict(os.environ), pip_config_files())
    if not values and not ca:
        return 0
    print(" ".join(write(Path(args.out_dir), values, ca)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
