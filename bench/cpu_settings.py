"""Which CPU settings help training and inference here (images per second).

    .venv/bin/python -m bench.cpu_settings [--batches 6]

Each figure is the median of a few timed batches after one warm-up batch, on
random inputs (the speed of a convolution does not depend on the pixels).
"""

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn


def _time(step, batches: int) -> float:
    step()  # warm-up: allocations, oneDNN kernel selection
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def train_rate(arch: str, size: int, batch: int, batches: int, channels_last: bool) -> float:
    model = torchvision.models.get_model(arch, weights=None, num_classes=5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 5, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return batch / _time(step, batches)


def eval_rate(arch: str, size: int, batch: int, batches: int, mode: str, channels_last: bool = False) -> float:
    model = torchvision.models.get_model(arch, weights=None, num_classes=5).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad

    def step():
        with context():
            model(x)

    return batch / _time(step, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, torch.get_num_threads()])
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} threads by default")
    for arch in ("mobilenet_v3_small", "resnet18"):
        for size in (64, 160):
            for threads in args.threads:
                torch.set_num_threads(threads)
                plain = train_rate(arch, size, 32, args.batches, channels_last=False)
                last = train_rate(arch, size, 32, args.batches, channels_last=True)
                print(
                    f"train {arch:<19} {size:>3}px batch 32 threads {threads}: "
                    f"contiguous {plain:7.1f} img/s  channels_last {last:7.1f} img/s",
                    flush=True,
                )
    from core.config import get_settings

    threads = get_settings().training_threads
    torch.set_num_threads(threads)
    print(f"inference at the product's {threads} thread(s):")
    for arch in ("mobilenet_v3_small", "resnet18"):
        for mode in ("no_grad", "inference_mode"):
            rate = eval_rate(arch, 160, 64, args.batches, mode)
            print(f"eval  {arch:<19} 160px batch 64 {mode:<15} {rate:7.1f} img/s", flush=True)
        for batch in (16, 32, 64, 128):
            for channels_last in (False, True):
                rate = eval_rate(arch, 224, batch, max(2, args.batches // 2), "inference_mode", channels_last)
                layout = "channels_last" if channels_last else "contiguous"
                print(f"features {arch:<19} 224px batch {batch:>3} {layout:<13} {rate:7.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
