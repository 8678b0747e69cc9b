"""Print the requirements one image installs: the core dependencies plus ONE stage extra.

Used by the Dockerfiles to install dependencies in a layer of their own, before
the project's code is copied (a code change then rebuilds only the last layer):

    python3 images/pyproject_deps.py judge > /tmp/requirements.txt
    python3 images/pyproject_deps.py judge --only torch      # -> torch==2.13.0
    # generate, on vLLM's image: what the base has stays at the base's version (vLLM's own constraints),
    # the rest at images/constraints.txt's
    python3 images/pyproject_deps.py generate --under base-freeze.txt --constraints images/constraints.txt

Self-references such as ``cmv-persuasion[clean,format]`` are expanded, so an
extra may build on another. Standard library only (the images have nothing else
yet when this runs).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(req: str) -> str:
    match = NAME_RE.match(req)
    if not match:
        raise ValueError(f"cannot read a package name from requirement {req!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict, extra: str) -> list[str]:
    """Core dependencies + the extra's, self-references expanded, first occurrence kept."""
    project = pyproject["project"]
    self_name = requirement_name(project["name"])
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise SystemExit(f"pyproject.toml has no extra {extra!r}; extras: {', '.join(sorted(extras))}")
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            if requirement_name(req) == self_name:
                inner = re.search(r"\[([^\]]*)\]", req)
                for name in inner.group(1).split(",") if inner else []:
                    name = name.strip()
                    if name and name not in seen_extras:
                        seen_extras.add(name)
                        add(extras[name])
            elif req not in out:
                out.append(req)

    add(list(project.get("dependencies", [])))
    seen_extras.add(extra)
    add(extras[extra])
    return out


def pins(lines: list[str]) -> dict[str, str]:
    """name -> the ``name==version`` line of a pip freeze / constraints file."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line and " @ " not in line:
            out[requirement_name(line)] = line
    return out


def under_base(reqs: list[str], base: dict[str, str], constraints: dict[str, str]) -> tuple[list[str], list[str]]:
    """Requirements for installing on an image whose packages must not move (vLLM's), and the conflicts.

    A package the base has is required at the base's version; any other at the constraints' version.
    A conflict: the project pins another version than the base has (printed, and the build fails).
    """
    out, conflicts = [], []
    for req in reqs:
        name = requirement_name(req)
        if name in base:
            pinned = re.search(r"==\s*([^;,\s]+)", req)
            have = base[name].split("==", 1)[1]
            # PEP 440: ==2.13.0 matches the local version 2.13.0+cpu (a CPU base's torch)
            if pinned and pinned.group(1) not in (have, have.split("+", 1)[0]):
                conflicts.append(f"{req} (the base image has {name}=={have})")
            out.append(base[name])
        else:
            out.append(constraints.get(name, req))
    return out, conflicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", help="the stage extra, e.g. clean, format, train, generate, judge")
    parser.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    parser.add_argument(
        "--only", help="print only this package's requirement (e.g. torch, to install it from another index)"
    )
    parser.add_argument("--under", help="a pip freeze of the base image: keep its versions (see under_base)")
    parser.add_argument("--constraints", help="with --under: pins for what the base does not have")
    args = parser.parse_args(argv)
    reqs = requirements(tomllib.loads(Path(args.pyproject).read_text()), args.extra)
    if args.under:
        base = pins(Path(args.under).read_text().splitlines())
        constraints = pins(Path(args.constraints).read_text().splitlines()) if args.constraints else {}
        reqs, conflicts = under_base(reqs, base, constraints)
        if conflicts:
            raise SystemExit(
                "pyproject.toml pins versions the base image does not have; change the base or the pins:"
                "\n  " + "\n  ".join(conflicts)
            )
    if args.only:
        reqs = [r for r in reqs if requirement_name(r) == requirement_name(args.only)]
        if not reqs:
            raise SystemExit(f"extra {args.extra!r} does not require {args.only!r}")
    sys.stdout.write("".join(r + "\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
