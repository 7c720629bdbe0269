"""Shared fixtures: a fresh data folder and database per test."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import Session

ROOT = Path(__file__).resolve().parent.parent


def _clear_caches(bind_queue: bool = True) -> None:
    from core.config import get_settings
    from core.db import clear_engines

    get_settings.cache_clear()
    clear_engines()
    if bind_queue and "jobs.queue" in sys.modules:
        sys.modules["jobs.queue"].bind_storage()


@pytest.fixture
def ptl_only(monkeypatch):
    """Versions are exported to `.ptl` alone (EXPORT_FORMATS=ptl), worker
    processes started afterwards included: for tests about something else
    than the export, since lowering to `.pte` costs several seconds a version
    (both formats are tested in test_training, test_model_quality, the
    pipeline, phone and browser tests)."""
    from core.config import get_settings

    monkeypatch.setenv("EXPORT_FORMATS", "ptl")
    get_settings.cache_clear()


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """DATA_DIR (and so the database) points at a new temporary folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.setenv("DATA_DIR", str(folder))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    # No test reaches for torchvision's server; test_weights serves its own.
    monkeypatch.setenv("WEIGHTS_DOWNLOAD", "false")
    _clear_caches()
    yield folder
    _clear_caches(bind_queue=False)


@pytest.fixture
def session(data_dir) -> Session:
    from core.db import get_engine

    with Session(get_engine(), expire_on_commit=False) as s:
        yield s


@pytest.fixture
def immediate_huey(data_dir):
    """Huey runs tasks in the calling thread (no consumer needed)."""
    from jobs import huey

    huey.immediate = True
    yield huey
    huey.immediate = False


class Worker:
    """A real consumer process (`python -m cli worker`) on the test's data folder."""

    def __init__(self, data_dir: Path, log_path: Path, **env):
        self.log_path = log_path
        self.env = {**os.environ, "DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **env}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Worker":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def worker_factory(data_dir, tmp_path):
    workers = []

    def start(**env) -> Worker:
        worker = Worker(data_dir, tmp_path / f"worker{len(workers)}.log", **env).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.2, message: str = "condition"):
    """Poll `predicate` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
