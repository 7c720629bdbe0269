"""Where a job trains: the device, and for several processes the DDP group.

A round with `processes` > 1 runs its training in that many processes that
follow `torchrun`'s conventions (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): `run_ranks` starts them from the queue worker and waits, and
each one runs `python -m core.distributed ROUND_ID`. Rank 0 alone writes to
the database and the data folder (epoch rows, checkpoints, exports, the
version); the others only read. The worker keeps the round's heartbeat going
and ends every rank when one fails, so a failure anywhere fails the attempt
and the usual retry resumes from rank 0's last checkpoint.
"""

import argparse
import contextlib
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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from core.config import REPO_ROOT, get_settings
from core.db import get_engine, read_engine
from core.errors import TrainingCancelled, UserError

log = logging.getLogger(__name__)

# A rank's exit status when the job was cancelled (rank 0 decides, all follow).
CANCELLED_EXIT = 3
# How long the ranks of a group wait for each other in one collective before
# giving up (rank 0 validates and checkpoints while the others wait).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def choose_device(local_rank: int = 0, world_size: int = 1) -> torch.device:
    """`cuda:LOCAL_RANK` when TRAINING_DEVICE allows it and a GPU is there, else the CPU."""
    wanted = get_settings().training_device
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            "TRAINING_DEVICE is cuda but this machine has no usable CUDA GPU; set TRAINING_DEVICE=auto or cpu"
        )
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"{world_size} processes on CUDA need one GPU each (NCCL), but this machine has "
            f"{torch.cuda.device_count()}: lower processes, or set TRAINING_DEVICE=cpu"
        )
    return torch.device("cuda", local_rank)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); none on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class Placement:
    """This process's place in a job: one process (rank 0 of 1) or one rank of a DDP group."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def local(cls) -> "Placement":
        """A job in the calling process alone."""
        return cls(choose_device())

    @property
    def leader(self) -> bool:
        """Rank 0: the only process that writes."""
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def describe(self) -> str:
        """What the round records as its device, e.g. "cpu x2 (gloo)" or
        "cuda:0 NVIDIA H100 80GB HBM3 (bf16)"."""
        text = str(self.device)
        if self.device.type == "cuda":
            precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(self.device)]
            text += f" {torch.cuda.get_device_name(self.device)} ({precision})"
        if self.world_size > 1:
            text += f" x{self.world_size} ({self.backend})"
        return text

    def threads(self, total: int) -> int:
        """CPU threads for this rank: the ranks on one machine share its cores."""
        return max(1, total // self.world_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train with: DDP around `model` in a group, else `model`."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def autocast(self):
        dtype = amp_dtype(self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for float16 (bfloat16 and float32 need none: then a no-op)."""
        return torch.amp.GradScaler(self.device.type, enabled=amp_dtype(self.device) == torch.float16)

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank (e.g. whether to stop for a cancel)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def sum(self, *values: torch.Tensor | float) -> list[float]:
        """Each value summed over the ranks."""
        tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()


def join_group() -> Placement:
    """Join the process group that torchrun's environment variables describe."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = choose_device(int(os.environ.get("LOCAL_RANK", rank)), world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    placement = Placement(device, rank, world_size)
    dist.init_process_group(placement.backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return placement


def free_port() -> int:
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
                command = [sys.executable, "-m", "core.distributed", str(round_id), "--errors", folder]
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
    parser = argparse.ArgumentParser(prog="python -m core.distributed")
    parser.add_argument("round_id", type=int)
    parser.add_argument("--errors", type=Path, required=True, help="folder for this rank's error text")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s rank {os.environ.get('RANK')} %(levelname)s %(message)s"
    )
    _exit_with_parent()
    from core import training

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
        training.train_rank(args.round_id, placement)
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
