"""The API under load: `GET /api/models/latest/`, `/api/models/training-status/{id}/`
and `/api/health/`, each hit by concurrent clients (one keep-alive
connection each) against the server as `make run` starts it
(`python -m core serve`, dashboard and API on one port, on loopback).

    .venv/bin/python -m bench.api_load [--clients 20 --requests 2000] [--baseline main]

`--baseline REF` measures the code of that git revision too, in the same
run (its tree from `git archive`, its own data folder, the same venv), and
prints both side by side. The clients are asyncio coroutines in this
process, sending raw HTTP/1.1, so the load generator costs little CPU next
to the server; on a machine with few cores it still shares them.
"""

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import ROOT, load_average, percentile, wait_until

# Run with the measured tree's own code (`python -c`, cwd = the tree), so an
# older revision seeds its own schema: a production version with its files,
# a completed round with 20 epochs, a viewer token. Prints "token job_id".
SEED = """
from core.access import CLI_ACTOR
from core.db import session_scope
from core.models import EpochMetric, RoundStatus, TrainingRound
from core.tokens import create_token
from tests.factories import add_fake_version

with session_scope() as session:
    version = add_fake_version(session, "1.0.0")
    round_ = TrainingRound(parameters={"epochs": 20}, status=RoundStatus.completed, total_images=1000,
                           model_version_id=version.id, classes=["cat", "dog"])
    session.add(round_)
    session.flush()
    for epoch in range(1, 21):
        session.add(EpochMetric(round_id=round_.id, epoch=epoch, train_loss=1, train_accuracy=50, val_loss=1,
                                val_accuracy=50, learning_rate=0.001, seconds=1.0))
    token = create_token(session=session, actor=CLI_ACTOR, role="viewer", label="bench").secret
    print(token, round_.job_id)
"""
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *([0-9]+)")


async def _client(port: int, request: bytes, requests: int, times: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(requests):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = CONTENT_LENGTH.search(head)
            if length is None:
                raise RuntimeError(f"an answer without Content-Length: {head.decode(errors='replace')}")
            body = await reader.readexactly(int(length.group(1)))
            times.append(time.perf_counter() - started)
            if head[9:12] != b"200":
                raise RuntimeError(f"{head[:12].decode()} {body[:200].decode(errors='replace')}")
    finally:
        writer.close()


def load(port: int, path: str, auth: str | None, clients: int, requests: int) -> tuple[list[float], float]:
    """Seconds per request of `clients` connections sending `requests` GETs
    each, all at once; and the requests answered per second."""
    header = f"Authorization: {auth}\r\n" if auth else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{header}\r\n".encode()
    times: list[float] = []

    async def run() -> None:
        await asyncio.gather(*(_client(port, request, requests, times) for _ in range(clients)))

    started = time.perf_counter()
    asyncio.run(run())
    return times, len(times) / (time.perf_counter() - started)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`python -m core serve` of `tree` on a free loopback port and its own
    data folder (`data_dir`, seeded with SEED unless told otherwise)."""

    def __init__(self, tree: Path, data_dir: Path | None = None, seed: bool = True) -> None:
        self.tree = tree
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="bench-api-"))
        self.env = {**os.environ, "DATA_DIR": str(self.data_dir), "PYTHONUNBUFFERED": "1"}
        self.env.pop("DATABASE_URL", None)
        self.auth = self.job_id = None
        if seed:
            out = subprocess.run(
                [sys.executable, "-c", SEED], cwd=tree, env=self.env, check=True, capture_output=True, text=True
            ).stdout.split()
            self.auth, self.job_id = f"Bearer {out[-2]}", out[-1]
        self.port = free_port()

    def __enter__(self) -> "Served":
        log = open(self.data_dir / "serve.log", "ab")
        command = [sys.executable, "-m", "core", "serve", "--port", str(self.port), "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            command, cwd=self.tree, env=self.env, stdout=log, stderr=log, start_new_session=True
        )

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health/", timeout=2).status == 200
            except OSError:
                return False

        wait_until(healthy, 180, 0.5)
        return self

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server's processes (web server and
        worker): per request, a figure the other programs on the machine move little."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # the process group
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def endpoints(self) -> list[tuple[str, str, str | None]]:
        """(name, path, Authorization) of the three measured routes."""
        return [
            ("latest", "/api/models/latest/", self.auth),
            ("training-status", f"/api/models/training-status/{self.job_id}/", self.auth),
            ("health", "/api/health/", None),
        ]


def measure(served: Served, clients: int, requests: int) -> list[dict]:
    """One row per route: p50, p95 (ms), requests/s, the server's CPU ms a
    request, the load average after."""
    rows = []
    for name, path, auth in served.endpoints():
        load(served.port, path, auth, 2, 5)  # warm-up: imports, first token use, caches
        cpu = served.cpu_seconds()
        times, rate = load(served.port, path, auth, clients, requests)
        rows.append(
            {
                "route": name,
                "cpu_ms": (served.cpu_seconds() - cpu) * 1000 / len(times),
                "p50_ms": percentile(times, 50) * 1000,
                "p95_ms": percentile(times, 95) * 1000,
                "per_s": rate,
                "load": load_average(),
            }
        )
    return rows


def tree_of(ref: str) -> Path:
    """The files of git revision `ref`, in a new temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-tree-{ref.replace('/', '_')}-"))
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def show(label: str, rows: list[dict], clients: int, requests: int) -> None:
    for row in rows:
        print(
            f"{label:>10}  GET {row['route']:<16} {clients} clients x {requests}: p50 {row['p50_ms']:6.1f} ms, "
            f"p95 {row['p95_ms']:6.1f} ms, {row['per_s']:6.0f} requests/s, server CPU {row['cpu_ms']:.2f} ms a request; "
            f"load average {row['load']:.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="per client")
    parser.add_argument("--baseline", help="a git revision to measure in the same run, e.g. main")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {load_average():.2f}", flush=True)
    trees = ([(args.baseline, tree_of(args.baseline))] if args.baseline else []) + [("this tree", ROOT)]
    results = []
    for label, tree in trees:
        with Served(tree) as served:
            rows = measure(served, args.clients, args.requests)
        show(label, rows, args.clients, args.requests)
        results.append((label, rows))
    if len(results) > 1:
        print("\nside by side:")
        for label, rows in results:
            show(label, rows, args.clients, args.requests)


if __name__ == "__main__":
    main()
