"""Real processes: the command line, the product's servers on loopback as
`make run` starts them, and PostgreSQL and Redis for the scale-out tests.

PostgreSQL and Redis are started from the Debian packages when their binaries
exist (`.ci/run` installs them); the tests that need them are skipped, with
the reason, if not.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, check: bool = True, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m cli ARGS` as a person runs it, in `env` (default: this
    process's environment, where the `data_dir` fixture has set DATA_DIR);
    with `check`, it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, folder: Path | None = None):
        self.proc, self.url, self.folder = proc, url, folder

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class AppServer(Server):
    """A server in its own process group (`python -m cli serve`: the web server and its worker)."""

    def stop(self) -> None:
        """SIGTERM the group; SIGKILL whatever of it is left after 20 s."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        try:
            self.proc.wait(timeout=20)
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        except subprocess.TimeoutExpired:
            pass
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def _start(command: list[str], health: str, log_path: Path, env: dict[str, str | None], *, answers=(200,)) -> AppServer:
    """`command` (+ the port, appended) in its own process group, once `health` answers with one of
    `answers`; its output goes to `log_path`. An env value of None removes that variable."""
    port = free_port()
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*command, str(port)],
            cwd=ROOT,
            env={k: v for k, v in merged.items() if v is not None},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = AppServer(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}{health}", timeout=2) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = None
        if status in answers:
            return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the server did not answer {health} in 120 s: {log_path.read_text()}")


def start_app(data_dir: Path, log_path: Path, **env: str | None) -> AppServer:
    """The product as `make run` starts it (web server, API and worker) on a free
    loopback port, answering /api/health/ (the caller stops it)."""
    command = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port"]
    return _start(command, "/api/health/", log_path, {"DATA_DIR": str(data_dir), **env})


def start_api(data_dir: Path, log_path: Path, **env: str | None) -> AppServer:
    """The HTTP API alone (`uvicorn api.app:app`) on a free loopback port, once it answers."""
    command = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port"]
    return _start(command, "/health/", log_path, {"DATA_DIR": str(data_dir), **env}, answers=(200, 503))


def start_web(log_path: Path, **env: str | None) -> AppServer:
    """`streamlit run server.py` (as `python -m cli serve` starts it, without a worker) on a free port."""
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "server.py"), "--server.address", "127.0.0.1",
               "--server.headless", "true", "--server.port"]  # fmt: skip
    return _start(command, "/_stcore/health", log_path, env)


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def start_postgres() -> Server:
    """initdb + postgres on a free loopback port; returns its URL (database `dashboard`)."""
    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp folders: those are private to root.
    folder = Path(tempfile.mkdtemp(prefix="dashboard-pg-"))
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
        folder.chmod(0o700)
    data = folder / "pgdata"
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "dashboard", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, proc)
    import psycopg

    for _ in range(50):
        try:
            with psycopg.connect(f"postgresql://dashboard@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE dashboard")
            break
        except psycopg.OperationalError:
            time.sleep(0.2)
    return Server(proc, f"postgresql://dashboard@127.0.0.1:{port}/dashboard", folder)


def start_redis() -> Server:
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("Redis is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, proc)
    return Server(proc, f"redis://127.0.0.1:{port}/0")
