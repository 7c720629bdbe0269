"""The layers of ARCHITECTURE.md: the core library never imports the edges."""

import pkgutil
import subprocess
import sys

import core
from tests.conftest import ROOT


def test_core_imports_no_streamlit_huey_or_fastapi():
    modules = [m.name for m in pkgutil.walk_packages(core.__path__, "core.") if m.name != "core.__main__"]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('streamlit', 'huey', 'fastapi', 'api', 'jobs', 'pages') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert len(modules) >= 10


def test_the_training_parameters_can_be_read_without_importing_torch():
    """Pages and the API read `core.training.config` (ranges, defaults); the
    package's `__init__` stays empty so that costs no torch import."""
    code = "import sys, core.training.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
