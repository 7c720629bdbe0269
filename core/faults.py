"""Crash and failure points, a testing aid for the recovery guarantees.

With `CRASH_AT=<name>` in its environment a process kills itself (SIGKILL, as
a power cut would) when it reaches that point; with `FAIL_AT=<name>` it raises
RuntimeError there (a bug or a bad input at that step). Otherwise they do nothing.
"""

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fail_point(name: str) -> None:
    if os.environ.get("FAIL_AT") == name:
        raise RuntimeError(f"failure injected at {name} (FAIL_AT)")
