"""The layers of ARCHITECTURE.md: the core library never imports the edges."""

import ast
import pkgutil
import subprocess
import sys

import core
from tests.conftest import ROOT


def test_core_imports_no_streamlit_huey_or_fastapi():
    modules = [m.name for m in pkgutil.walk_packages(core.__path__, "core.")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('streamlit', 'huey', 'fastapi', 'api', 'jobs', 'pages', 'cli') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "core.__main__" in modules and len(modules) >= 10


def test_python_m_core_still_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "core", "versions", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m cli versions" in result.stdout


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of this project it imports anywhere in its text
    (inside functions too: a lazy import that hides a cycle still counts)."""
    paths = {}
    for package in ("core", "api", "jobs", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                parts = path.relative_to(ROOT).with_suffix("").parts
                paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*here.split(".")[: len(here.split(".")) - node.level + 1], *filter(None, [base])])
                found.update(f"{base}.{alias.name}" for alias in node.names)
                found.add(base)
        # `from core import gate` names a module; `from core.db import get_engine` names its module.
        graph[name] = {_module_of(target, paths) for target in found} - {None, name}
    return graph


def _module_of(target: str, modules) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_module_of_core_api_jobs_or_cli_is_part_of_an_import_cycle():
    graph = _import_graph()
    reach = {name: _reachable(graph, name) for name in graph}
    cycles = {frozenset(n for n in reach[m] if m in reach[n]) for m in graph if m in reach[m]}
    assert {"core.training", "cli", "api.routes", "jobs.queue"} <= graph.keys()
    assert "core.gate" in reach["core.training.register"] and "jobs" in reach["cli.training"]
    assert not cycles, sorted(map(sorted, cycles))


def test_the_training_parameters_can_be_read_without_importing_torch():
    """Pages and the API read `core.training.config` (ranges, defaults); the
    package's `__init__` stays empty so that costs no torch import."""
    code = "import sys, core.training.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
