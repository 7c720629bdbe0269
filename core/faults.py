"""Crash points, a testing aid for the recovery guarantees.

With `CRASH_AT=<name>` in its environment a process kills itself (SIGKILL, as
a power cut would) when it reaches that point; otherwise this does nothing.
"""

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
