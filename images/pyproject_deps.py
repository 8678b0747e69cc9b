"""Print the requirements one image installs: the core dependencies plus ONE stage extra.

Used by the Dockerfiles to install dependencies in a layer of their own, before
the project's code is copied (a code change then rebuilds only the last layer):

    python3 images/pyproject_deps.py judge > /tmp/requirements.txt
    python3 images/pyproject_deps.py judge --only torch      # -> torch==2.13.0

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
                for name in (inner.group(1).split(",") if inner else []):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", help="the stage extra, e.g. clean, format, train, generate, judge")
    parser.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    parser.add_argument("--only", help="print only this package's requirement (e.g. torch, to install it from another index)")
    args = parser.parse_args(argv)
    reqs = requirements(tomllib.loads(Path(args.pyproject).read_text()), args.extra)
    if args.only:
        reqs = [r for r in reqs if requirement_name(r) == requirement_name(args.only)]
        if not reqs:
            raise SystemExit(f"extra {args.extra!r} does not require {args.only!r}")
    sys.stdout.write("".join(r + "\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
