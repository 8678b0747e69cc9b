"""The layout's rules (docs/ARCHITECTURE.md), checked by the real tools: import-linter's contracts and
ruff's lint and format (both configured in pyproject.toml), no import cycle between any two modules,
no module over 500 lines or function over 80, and every stage package importing only what its
image installs. Each tool is a dev dependency: a missing one fails the test, never skips it."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

from cmv_core import stages

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
SIZE_CHECKED = ("cmv_core", "jobs", "benchmarks")

sys.path.insert(0, str(REPO / "images"))
import pyproject_deps  # noqa: E402


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    tool = BIN / name
    assert tool.exists(), f"{name} is not installed in {BIN} (it is a dev dependency: make install)"
    return subprocess.run([str(tool), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_contracts():
    proc = run_tool("lint-imports", "--no-cache")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_ruff_check():
    proc = run_tool("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_ruff_format():
    proc = run_tool("ruff", "format", "--check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def import_graph() -> grimp.ImportGraph:
    # Every import statement counts, function-local ones included (grimp reads them all).
    return grimp.build_graph("cmv_core", "jobs", include_external_packages=True, cache_dir=None)


def own_modules(graph: grimp.ImportGraph) -> list[str]:
    return sorted(m for m in graph.modules if m.split(".")[0] in ("cmv_core", "jobs"))


def test_no_import_cycles(import_graph):
    cycles = set()
    for module in own_modules(import_graph):
        for imported in import_graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] not in ("cmv_core", "jobs"):
                continue
            back = import_graph.find_shortest_chain(importer=imported, imported=module)
            if back:  # one entry per cycle, whichever module it was found from
                loop = (module, *back[1:-1]) if len(back) > 2 else (module, imported)
                start = loop.index(min(loop))
                cycles.add(" -> ".join((*loop[start:], *loop[:start], loop[start])))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def python_files() -> list[Path]:
    return sorted(p for root in SIZE_CHECKED for p in (REPO / root).rglob("*.py"))


def test_module_and_function_sizes():
    too_big = []
    for path in python_files():
        text = path.read_text()
        rel = path.relative_to(REPO)
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {n} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_FUNCTION_LINES:
                    too_big.append(f"{rel}:{node.lineno} {node.name}: {span} lines (limit {MAX_FUNCTION_LINES})")
    assert not too_big, "\n".join(too_big)


def test_size_check_measures_what_it_claims(tmp_path):
    # A planted 81-line function is found; an 80-line one is not.
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    for lines, found in ((80, False), (81, True)):
        src = f"def f():\n{body}\n" + ("    return 1\n" if lines == 81 else "")
        node = ast.parse(src).body[0]
        assert (node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES) is found


def distributions_of(top_level: str) -> set[str]:
    names = importlib.metadata.packages_distributions().get(top_level, [])
    return {pyproject_deps.requirement_name(n).lower().replace("_", "-") for n in names}


def image_requirements(stage: stages.Stage) -> set[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = pyproject_deps.requirements(pyproject, stage.extra)
    if stage.extra == "generate":  # the generate image's base holds vLLM (images/generate.Dockerfile)
        reqs += pyproject["project"]["optional-dependencies"]["vllm"]
    return {pyproject_deps.requirement_name(r).lower().replace("_", "-") for r in reqs}


def external_imports(graph: grimp.ImportGraph, stage: stages.Stage, root: Path = REPO) -> dict[str, set[str]]:
    """Third-party top-level packages a stage's code imports -> the modules that import them.

    The stage's own package counts every import (function-local ones too); the shared modules it
    reaches count their module-level imports only, since a shared module's function-local import
    (models.py's transformers, say) belongs to the functions another stage calls."""
    package = stage.entry.rsplit(".", 1)[0]
    first_party = {package.split(".")[0], "cmv_core", "jobs"}
    own = {m for m in graph.modules if m == package or m.startswith(package + ".")}
    reached = set(own)
    for m in own:
        reached |= graph.find_upstream_modules(m)
    found: dict[str, set[str]] = {}
    for module in sorted(m for m in reached if m.split(".")[0] in first_party):
        path = root / (module.replace(".", "/") + ".py")
        path = path if path.exists() else root / module.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if module in own else tree.body
        for node in nodes:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in first_party:
                    found.setdefault(top, set()).add(module)
    return found


def missing_from_image(graph: grimp.ImportGraph, stage: stages.Stage, root: Path = REPO) -> list[str]:
    allowed = image_requirements(stage)
    missing = []
    for top, importers in sorted(external_imports(graph, stage, root).items()):
        dists = distributions_of(top) or {top.lower()}
        if top not in OPTIONAL_AT_RUN_TIME and not dists & allowed:
            missing.append(f"{top} ({', '.join(sorted(dists))}) imported by {', '.join(sorted(importers))}")
    return missing


# Imported only inside a try/except that falls back without them (the stage runs without the package).
OPTIONAL_AT_RUN_TIME = {"isal"}


@pytest.mark.parametrize("stage", [s for s in stages.PIPELINE if s.name == s.command], ids=lambda s: s.name)
def test_stage_imports_only_what_its_image_installs(import_graph, stage):
    missing = missing_from_image(import_graph, stage)
    assert not missing, f"the {stage.name} image (extra {stage.extra!r}) does not install:\n" + "\n".join(missing)


def test_dependency_check_catches_a_planted_import(tmp_path, monkeypatch):
    # A stage that imports kubernetes in a function, and reaches a shared module that imports torch at
    # module level: neither is in the clean image. A shared module's function-local import is not counted.
    pkg = tmp_path / "planted"
    (pkg / "stage").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stage" / "__init__.py").write_text("")
    (pkg / "stage" / "run.py").write_text(
        "import yaml\nfrom planted import shared\n\ndef f():\n    import kubernetes\n"
    )
    (pkg / "shared.py").write_text("import torch\n\ndef g():\n    import vllm\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("planted", include_external_packages=True, cache_dir=None)
    planted = stages.Stage("planted", "", "clean", "planted.stage.run", "clean", (), ())
    missing = missing_from_image(graph, planted, root=tmp_path)
    assert [m.split(" ")[0] for m in missing] == ["kubernetes", "torch"]


def test_every_stage_command_has_its_image_job_entry_and_manifest():
    for command in stages.COMMANDS:
        assert (REPO / "images" / f"{command}.Dockerfile").is_file(), command
        assert (REPO / "jobs" / f"{command}.py").is_file(), command
        assert (REPO / "k8s" / "base" / command / "job.yaml").is_file(), command
    for stage in stages.PIPELINE:
        __import__(stage.entry.rsplit(".", 1)[0])
        assert stage.config is None or ":" in stage.config
