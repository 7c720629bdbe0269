"""The GPU path, checked on a machine with CUDA: a 1-process job on the GPU
(mixed precision), the same job on the CPU, and a 2-process gloo job on the
CPU, on the same demo images. Prints each round's recorded device, validation
accuracy and timings. On a machine without CUDA the first job runs on the CPU
(TRAINING_DEVICE=auto falls back) and says so.

    python -m bench.gpu_check [--per-category 60] [--size 64] [--epochs 5] [--runs auto:1 cpu:1 cpu:2]

Each run is TRAINING_DEVICE:processes; a second `auto:1` shows the GPU warm
(CUDA and cuDNN set up by the first).

NCCL needs one GPU per process, so with one GPU the 2-process job runs gloo
on the CPU. Where ExecuTorch is not installed (the GPU machine's torch is not
the version it is built for), run this with `core/export.py` FORMATS patched
to ("ptl",) in that copy only: the jobs then export `.ptl` alone, which the
output shows.
"""

import argparse
import os

import torch

from bench.common import fresh_data_dir
from bench.distributed import load_demo, run_job, show


def use_device(name: str) -> None:
    from core.config import get_settings

    os.environ["TRAINING_DEVICE"] = name  # the ranks inherit it
    get_settings.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-category", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--runs", nargs="+", default=["auto:1", "cpu:1", "cpu:2"])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}", flush=True)
    fresh_data_dir("gpu")
    load_demo(args.per_category, args.size)
    job = {"epochs": args.epochs, "batch_size": 32, "learning_rate": 0.002, "image_size": args.size}
    job["use_existing_model"] = False
    for run in args.runs:
        device, processes = run.split(":")
        use_device(device)
        figures = run_job({**job, "processes": int(processes)})
        print(f"TRAINING_DEVICE={device}, {processes} process(es): {show(figures)}", flush=True)


if __name__ == "__main__":
    main()
