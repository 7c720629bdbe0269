"""Shared by the benchmarks: a throw-away DATA_DIR, a real consumer, figures."""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fresh_data_dir(prefix: str) -> Path:
    """Point DATA_DIR (and so the database and queue) at a new empty folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    os.environ["DATA_DIR"] = str(folder)
    os.environ.pop("DATABASE_URL", None)
    from core.config import get_settings
    from core.db import clear_engines

    get_settings.cache_clear()
    clear_engines()
    if "jobs.queue" in sys.modules:
        sys.modules["jobs.queue"].bind_storage()
    return folder


def start_worker(data_dir: Path, log_name: str = "worker.log") -> subprocess.Popen:
    """`python -m cli worker` on `data_dir`, as `make run` starts it."""
    env = {**os.environ, "DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    with open(data_dir / log_name, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env, stdout=log, stderr=log)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout}s")


def load_average() -> float:
    return os.getloadavg()[0]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[p - 1]
