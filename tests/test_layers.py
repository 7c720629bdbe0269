"""The layers of ARCHITECTURE.md: the core library never imports the edges."""

import pkgutil
import subprocess
import sys

import core
from tests.conftest import ROOT


def test_core_imports_no_streamlit_huey_or_fastapi():
    modules = [f"core.{m.name}" for m in pkgutil.iter_modules(core.__path__)]
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
