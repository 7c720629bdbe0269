"""`python -m core COMMAND`: the command line's old name, kept for existing scripts.

The command line is an edge (it imports `jobs`, and so Huey) and lives in the
top-level package `cli/`. This file only hands over to it when run as a
program; importing `core.__main__` imports nothing, so the layer rule
(tests/test_layers.py) holds for it like for any other core module.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("cli", run_name="__main__", alter_sys=True)
