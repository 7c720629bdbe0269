"""Where a job trains: the device, the memory layout of its batches, and for
several processes its place in the DDP group (`Placement`).

A job in one process is `Placement.local()`; each rank of a DDP group (see
`core.training.ranks`) joins the group that torchrun's environment
variables describe with `join_group`.
"""

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

import torch
import torch.distributed as dist
from torch import nn

from core.config import get_settings
from core.dataset import normalize
from core.errors import UserError

# How long the ranks of a group wait for each other in one collective before
# giving up (rank 0 validates and checkpoints while the others wait).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Measured with bench/cpu_settings.py on this project's 2-core machine, one
# thread (BENCHMARKS.md): channels_last trains mobilenet_v3_small at 64 px at
# 776 images/s against 414 in the default layout, at 160 px 219 against 125,
# resnet18 at 160 px 35 against 27 (at 64 px, the same); inference gains as much.
MEMORY_FORMAT = torch.channels_last
CPU = torch.device("cpu")


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


# Architectures whose training steps run faster in bfloat16 autocast on a CPU
# that computes bfloat16 natively (AVX-512 BF16 or AMX), measured on this
# project's 2-core machine, 2 threads, batch 32 (BENCHMARKS.md section 9,
# session 11): resnet18 at 64 px 1.4 - 1.8x the images/s of float32, at 128
# px 1.8x; mobilenet_v3_small and efficientnet_b0 (depthwise convolutions)
# about half as fast, so they stay in float32.
CPU_BF16_ARCHITECTURES = ("resnet18",)


@cache
def cpu_computes_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (else emulated: slower)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_dtype(device: torch.device, architecture: str | None = None) -> torch.dtype | None:
    """The training steps' mixed precision: on CUDA bfloat16 where supported,
    else float16; on the CPU bfloat16 for `architecture`s it speeds up on a
    CPU that computes it natively (CPU_BF16_ARCHITECTURES, TRAINING_CPU_BF16),
    else none. Evaluation always runs in float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if architecture in CPU_BF16_ARCHITECTURES and get_settings().training_cpu_bf16 and cpu_computes_bf16():
        return torch.bfloat16
    return None


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

    def describe(self, architecture: str | None = None) -> str:
        """What the round records as its device, e.g. "cpu x2 (gloo)", "cpu
        (bf16)" or "cuda:0 NVIDIA H100 80GB HBM3 (bf16)"."""
        text = str(self.device)
        if self.device.type == "cuda":
            text += f" {torch.cuda.get_device_name(self.device)}"
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: None}[amp_dtype(self.device, architecture)]
        if precision:
            text += f" ({precision})"
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

    def autocast(self, architecture: str | None = None):
        """The training step's precision context (`amp_dtype`)."""
        dtype = amp_dtype(self.device, architecture)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self, architecture: str | None = None) -> torch.amp.GradScaler:
        """Loss scaling for float16 (bfloat16 and float32 need none: then a no-op)."""
        return torch.amp.GradScaler(self.device.type, enabled=amp_dtype(self.device, architecture) == torch.float16)

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


def prepare_batch(x: torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
    """uint8 images to the model's input on `device`: normalised, in the fast
    memory layout. The pixels travel as uint8 (a quarter of the bytes)."""
    return normalize(x.to(device, non_blocking=True)).contiguous(memory_format=MEMORY_FORMAT)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
