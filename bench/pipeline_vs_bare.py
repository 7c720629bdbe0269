"""Training throughput: (a) the product (enqueue, consumer, database, cache,
metrics, checkpoints) against (b) a plain PyTorch loop over tensors already in
memory and (c) that loop with the best CPU settings found, same model, images,
split, input size, batch size and epochs, one after the other.

    .venv/bin/python -m bench.pipeline_vs_bare --architecture resnet18 --size 160

Each loop validates every epoch, as the product does for its live charts.
(a) is timed from enqueue to the last epoch row (queue pickup, decoding and
all); the export that follows, once per job, is printed separately. It runs
twice on the same consumer: cold (images decoded) and warm (a second job,
as a retrain is: pixels from the cache).
"""

import argparse
import os
import statistics
import time

import torch
import torchvision
from torch import nn

from bench.common import fresh_data_dir, load_average, start_worker, stop, wait_until

# How often this script looks at the round it times. Its looks take CPU from
# the round on a 2-core machine: every 20 ms, reading the round's whole row
# (6 ms of CPU each, a quarter of a core) held the rounds' epochs to a median
# 0.83x of the best loop; at 0.25 s they ran at 0.98x (both with the fused
# AdamW the product uses: BENCHMARKS.md section 9, sessions 9 and 10).
POLL = 0.25


def product_run(params: dict) -> tuple[float, float, float]:
    """Seconds to the last epoch row, to completion, and in the round's own
    epoch timings (`EpochMetric.seconds`: training and validation, the
    issue's measure of throughput)."""
    from sqlmodel import func, select

    from core.access import Actor, Role
    from core.config import get_settings
    from core.db import read_session
    from core.models import EpochMetric, ModelVersion, RoundStatus, TrainingRound
    from jobs import submit_training

    def state(round_id):
        """The round's status and epoch rows, two small queries (not the
        round's row, whose snapshot lists every image)."""
        with read_session() as s:
            status = s.exec(select(TrainingRound.status).where(TrainingRound.id == round_id)).one()
            count = select(func.count()).select_from(EpochMetric).where(EpochMetric.round_id == round_id)
            return status, s.exec(count).one()

    started = time.perf_counter()
    round_ = submit_training(params, actor=Actor("bench", Role.operator))
    wait_until(lambda: state(round_.id)[1] == params["epochs"], timeout=1800, interval=POLL)
    trained = time.perf_counter() - started
    status = wait_until(
        lambda: (s := state(round_.id)[0]) in (RoundStatus.completed, RoundStatus.failed) and s, 1800, POLL
    )
    with read_session() as s:
        r = s.get(TrainingRound, round_.id)
        assert status == RoundStatus.completed, r.error

    def exported():
        with read_session() as s:
            version = s.exec(select(ModelVersion).where(ModelVersion.round_id == round_.id)).one()
            return len(version.artifacts) == len(get_settings().formats)

    # The job ends when the formats made after the commit (the .pte) are added:
    # the consumer takes the next job only then.
    wait_until(exported, 1800, POLL)
    done = time.perf_counter() - started
    with read_session() as s:
        epochs = sum(m.seconds for m in s.exec(select(EpochMetric).where(EpochMetric.round_id == round_.id)))
    return trained, done, epochs


def loop_run(arch, classes, x_train, y_train, x_val, y_val, epochs, batch_size, best: bool) -> float:
    """A minimal loop; `best` adds channels_last and inference_mode."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes)
    if best:
        model = model.to(memory_format=torch.channels_last)
        x_train = x_train.contiguous(memory_format=torch.channels_last)
        x_val = x_val.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.001)
    no_grad = torch.inference_mode if best else torch.no_grad
    # One untimed step: oneDNN picks its kernels (the product pays this in (a)).
    nn.functional.cross_entropy(model(x_train[:batch_size]), y_train[:batch_size]).backward()
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train))
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            if len(idx) < 2:
                continue
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
        model.eval()
        with no_grad():
            correct = sum(
                int((model(x_val[b : b + 128]).argmax(1) == y_val[b : b + 128]).sum())
                for b in range(0, len(y_val), 128)
            )
    del correct
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-category", type=int, default=40, help="demo images per category (5 categories)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for all three (0: the product's default)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="warm product rounds and best loops, interleaved: medians (noisy machines)",
    )
    args = parser.parse_args()
    from core.config import get_settings

    threads = args.threads or get_settings().training_threads
    os.environ["TORCH_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    data_dir = fresh_data_dir("pipeline")
    from core.db import session_scope
    from core.demo import load_demo_dataset

    with session_scope() as session:
        load_demo_dataset(session=session, per_category=args.per_category, size=96)
    params = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "architecture": args.architecture,
        "image_size": args.size,
        "use_existing_model": False,
    }
    load_before = load_average()
    worker = start_worker(data_dir)
    try:
        time.sleep(8)  # an idle consumer, imports done
        trained, done, epochs = product_run(params)
        warm, _, warm_epochs = product_run(params)
        data = training_data(args)

        def best_loop() -> float:
            return loop_run(args.architecture, *data, args.epochs, args.batch_size, best=True)

        # Interleaved, so that a slower spell of a shared machine hits both alike.
        pairs = [(warm_epochs, best_loop())]
        pairs += [(product_run(params)[2], best_loop()) for _ in range(args.repeats - 1)]
    finally:
        stop(worker)

    classes, *tensors = data
    plain = loop_run(args.architecture, classes, *tensors, args.epochs, args.batch_size, best=False)
    best = statistics.median(b for _, b in pairs)
    load_after = load_average()

    n = len(tensors[1]) * args.epochs
    a, warm_a, b, c = n / trained, n / warm, n / plain, n / best
    print(
        f"{args.architecture} {args.size}px, {len(tensors[1])} train + {len(tensors[3])} val images, "
        f"{args.epochs} epochs, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print(f"(a) product  {a:7.1f} img/s  ({trained:.1f} s to the last epoch; {done - trained:.1f} s more to export)")
    print(f"(a) warm     {warm_a:7.1f} img/s  ({warm:.1f} s, the same job again on the same consumer)")
    print(f"(b) plain    {b:7.1f} img/s  ({plain:.1f} s)")
    print(f"(c) best     {c:7.1f} img/s  ({best:.1f} s; median of {len(pairs)})")
    own = n / epochs
    ratios = [(n / product) / (n / loop) for product, loop in pairs]
    print(
        f"(a) epochs   {own:7.1f} img/s cold; warm rounds' own epoch timings against the best loop run beside each: "
        + ", ".join(f"{n / product:.1f} / {n / loop:.1f}" for product, loop in pairs)
    )
    print(
        f"cold a/b {a / b:.2f} a/c {a / c:.2f}; warm a/b {warm_a / b:.2f} a/c {warm_a / c:.2f}; "
        f"epoch timings / best loop, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)} "
        f"(median {statistics.median(ratios):.2f}); load average {load_before:.2f} -> {load_after:.2f}"
    )


def training_data(args) -> tuple:
    """(classes, x_train, y_train, x_val, y_val): the images and split of the
    product's round, decoded once into memory for the loops."""
    from core.dataset import load_images, normalize
    from core.db import session_scope
    from core.splits import split_snapshot
    from core.training.preflight import validated_images

    with session_scope() as session:
        rows = validated_images(session=session)
        from core.ingest import image_path

        paths = [image_path(img) for img, _ in rows]
        classes = sorted({label for _, label in rows})
        labels = [classes.index(label) for _, label in rows]
        keys = [img.split_key for img, _ in rows]
    # The images the pipeline's round trained and validated on (test images left out).
    split = split_snapshot(keys, labels, classes, 0.2, 42)
    train_idx, val_idx = split.train, split.val
    x = normalize(load_images(paths, args.size))
    y = torch.tensor(labels)
    return len(classes), x[train_idx], y[train_idx], x[val_idx], y[val_idx]


if __name__ == "__main__":
    main()
