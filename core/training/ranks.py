"""Starting and watching the processes (DDP ranks) of a round with `processes` > 1.

They follow `torchrun`'s conventions (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): `run_ranks` starts them from the queue worker and
waits, and each one runs `python -m core.training.ranks ROUND_ID`
(`main`, which joins the group and runs `core.training.loop.train_rank`).
Rank 0 alone writes to the database and the data folder (epoch rows,
checkpoints, exports, the version); the others only read. The worker keeps
the round's heartbeat going and ends every rank when one fails, so a
failure anywhere fails the attempt and the usual retry resumes from rank
0's last checkpoint.
"""

import argparse
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch.distributed as dist

from core.config import REPO_ROOT
from core.db import get_engine, read_engine
from core.errors import TrainingCancelled
from core.training.loop import train_rank
from core.training.placement import join_group

log = logging.getLogger(__name__)

# A rank's exit status when the job was cancelled (rank 0 decides, all follow).
CANCELLED_EXIT = 3


def free_port() -> int:
    """A TCP port free on the loopback now (for the group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Seconds the other ranks get to exit after one failed (see `_wait_for_ranks`).
FAILURE_GRACE = 2.0


def run_ranks(round_id: int, world_size: int, poll: float = 0.2) -> None:
    """Train round `round_id` in `world_size` processes on this machine and wait for them.

    Raises TrainingCancelled when rank 0 stopped for a cancel, RuntimeError
    naming the first rank that failed (the others are ended at once, since
    they would wait for it)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"round-{round_id}-") as folder:
        errors = Path(folder)
        procs = []
        try:
            for rank in range(world_size):
                env = {
                    **os.environ,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                }
                command = [sys.executable, "-m", "core.training.ranks", str(round_id), "--errors", folder]
                procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env))
            failed = _wait_for_ranks(procs, poll, errors)
        finally:
            _end(procs)
        if failed is None:
            return
        rank, code = failed
        if code == CANCELLED_EXIT:
            raise TrainingCancelled()
        error_file = errors / f"rank{rank}.txt"
        if error_file.is_file():
            reason = error_file.read_text()
        elif code < 0:
            reason = f"killed by {signal.Signals(-code).name}"
        else:
            reason = f"exited with status {code}"
        raise RuntimeError(f"rank {rank} of {world_size} failed: {reason}")


def _wait_for_ranks(procs: list[subprocess.Popen], poll: float, errors: Path) -> tuple[int, int] | None:
    """Until all exit 0 (None) or one does not: (its rank, its status).

    The rank that failed first is named, since the others usually failed
    because it was gone (gloo's "Connection closed by peer"): one killed by a
    signal (it wrote no error), else the one whose error was written first.
    A killed rank's sockets close before its exit status can be read, so
    after the first failure the others get `FAILURE_GRACE` seconds to finish
    exiting before one is named."""
    while True:
        codes = [p.poll() for p in procs]
        if any(code not in (None, 0) for code in codes):
            deadline = time.monotonic() + FAILURE_GRACE
            while None in codes and time.monotonic() < deadline:
                time.sleep(0.05)
                codes = [p.poll() for p in procs]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            return min(failed, key=lambda pair: (pair[1] >= 0, _written_at(errors / f"rank{pair[0]}.txt"), pair[0]))
        if all(code == 0 for code in codes):
            return None
        time.sleep(poll)


def _written_at(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return math.inf


def _end(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_with_parent() -> None:
    """A rank ends itself when the worker that started it is gone (killed, say)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """One rank of a round's DDP group (see `run_ranks`)."""
    parser = argparse.ArgumentParser(prog="python -m core.training.ranks")
    parser.add_argument("round_id", type=int)
    parser.add_argument("--errors", type=Path, required=True, help="folder for this rank's error text")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s rank {os.environ.get('RANK')} %(levelname)s %(message)s"
    )
    _exit_with_parent()
    placement = None
    try:
        # The database first (its schema check takes SQLite's write lock for a
        # moment): once in the group, rank 0 may hold that lock while it waits
        # for the others at a collective, and a rank still opening it would
        # wait out the busy timeout.
        if os.environ.get("RANK") == "0":
            get_engine()
        else:
            read_engine()
        placement = join_group()
        train_rank(args.round_id, placement)
        return 0
    except TrainingCancelled:
        return CANCELLED_EXIT
    except BaseException as exc:
        log.exception("rank %s failed", os.environ.get("RANK"))
        (args.errors / f"rank{os.environ.get('RANK')}.txt").write_text(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        if placement is not None:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
