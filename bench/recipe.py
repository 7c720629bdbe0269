"""Ablation of the training recipe (core/training/recipe.py): the previous recipe, each
change on its own, and all kept changes together, from scratch, per kind of
real-looking data; prints held-out accuracy.

    TORCH_THREADS=1 .venv/bin/python -m bench.recipe [--kinds digits,glyphs,documents]
        [--size 48 --epochs 10 --processes 2] [--architecture resnet18 --bf16]

With `--click`, instead the "default manual click" per kind: the pictures
ingested into a fresh DATA_DIR, one round with the seed defaults (epochs 20,
batch 32, learning rate 0.001, image size auto, no pretrained weights) run
by the product, and the downloaded .ptl scored on the round's held-out test
pictures; `--before` runs the same with the previous recipe (`Recipe()`).

Each run is the product's `full`-mode loop reduced to its training core: the
same model builder, optimizer, schedule (stepped per batch), loss, batch
augmentation, BatchNorm recalibration and evaluation, on pictures decoded once
into memory; 80 % of each kind trains, the other 20 % (never seen) scores the
model of the last epoch. One seed per cell: differences of 1-2 points are noise.
"""

import argparse
import contextlib
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from functools import cache

import numpy as np
import torch
import torchvision

from bench import datasets
from core.training import recipe as recipes
from core.training.recipe import RECIPE, Recipe

BASELINE = Recipe()
# Each change on its own against the baseline, then the product's recipe.
VARIANTS = {
    "baseline (before)": BASELINE,
    "no flip": replace(BASELINE, augment="none"),
    "affine (no flip)": replace(BASELINE, augment="affine"),
    "warm-up 5 %": replace(BASELINE, warmup=0.05),
    "peak 3x lr": replace(BASELINE, peak_factor=3.0),
    "weight decay 0.05": replace(BASELINE, weight_decay=0.05),
    "label smoothing 0.1": replace(BASELINE, label_smoothing=0.1),
    "zero-init residual": replace(BASELINE, zero_init_residual=True),
    "RECIPE (kept)": RECIPE,
}


@cache
def load_kind(kind: str, size: int, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`count` pictures of one kind as uint8 N x 3 x size x size, labels, number of classes."""
    images, labels = datasets.glyphs(count) if kind == "glyphs" else datasets.KINDS[kind]()
    images, labels = images[:count], labels[:count]
    classes = sorted(set(labels))
    x = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in images])
    return (
        torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([classes.index(v) for v in labels]),
        len(classes),
    )


def run(kind: str, name: str, recipe: Recipe, args) -> tuple[str, str, float, float]:
    """Held-out accuracy (%) of one recipe on one kind, and the seconds it took."""
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
    from core.training import evaluation, placement

    x, y, n_classes = load_kind(kind, args.size, args.count)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = len(y) // 5
    test, train = order[:cut], order[cut:]
    torch.manual_seed(args.seed)
    # Not training.build_model, which applies the product's RECIPE: each row its own.
    model = torchvision.models.get_model(args.architecture, weights=None, num_classes=n_classes)
    model = recipes.init_model(model, recipe).to(memory_format=placement.MEMORY_FORMAT)
    steps = -(-len(train) // args.batch_size)
    optimizer = recipes.build_optimizer(model, args.learning_rate, recipe)
    scheduler = recipes.build_scheduler(optimizer, args.epochs, steps, recipe)
    loss_fn = recipes.build_loss(recipe)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        shuffled = train[torch.randperm(len(train), generator=generator)]
        for b in range(steps):
            idx = shuffled[b * args.batch_size : (b + 1) * args.batch_size]
            if len(idx) < 2:
                continue
            batch = placement.prepare_batch(recipes.augment_batch(x[idx], generator, recipe))
            optimizer.zero_grad(set_to_none=True)
            # --bf16: the training steps in bfloat16 autocast, as the product
            # trains CPU_BF16_ARCHITECTURES; evaluation stays float32.
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
            with amp:
                loss = loss_fn(model(batch), y[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
    evaluation.recalibrate_batchnorm(model, x[train])
    _, logits = evaluation.evaluate(model, x[test], y[test])
    return kind, name, evaluation.accuracy(logits, y[test]), time.perf_counter() - started


def click(kind: str, count: int) -> str:
    """One default round on `count` pictures of `kind`; a line with its .ptl's held-out accuracy."""
    from bench.common import fresh_data_dir
    from core.db import session_scope
    from core.export import load_runner
    from core.ingest import image_path, ingest_bytes
    from core.models import ImageStatus, TrainingImage, TrainingRound
    from core.splits import split_snapshot
    from core.training import rounds as training

    data_dir = fresh_data_dir(f"recipe-{kind}")
    images, labels = datasets.glyphs(count) if kind == "glyphs" else datasets.KINDS[kind]()
    with session_scope() as session:
        for i, (image, label) in enumerate(zip(images[:count], labels[:count], strict=True)):
            ingest_bytes(datasets.png(image), f"{i}.png", session=session, category=label, status=ImageStatus.validated)
    with session_scope() as session:
        round_id = training.start_training({"use_existing_model": False}, session=session).id
    started = time.perf_counter()
    with session_scope() as session:
        version = training.run_training_round(round_id, session=session)
        round_ = session.get(TrainingRound, round_id)
        assert version is not None, round_.error
        seconds = time.perf_counter() - started
        classes, snapshot, params = version.classes, round_.snapshot, round_.parameters
        labels_of = [classes.index(s["label"]) for s in snapshot]
        test = split_snapshot([s["split_key"] for s in snapshot], labels_of, classes, params["val_split"], 0).test
        paths = [image_path(session.get(TrainingImage, snapshot[i]["id"])) for i in test]
        ptl = next(a for a in version.artifacts if a["format"] == "ptl")
        recorded = version.metrics["test_accuracy"]
    from core.dataset import load_images, normalize

    x = normalize(load_images(paths, version.image_size))
    run_ptl = load_runner(data_dir / ptl["path"], "ptl")
    with torch.inference_mode():
        hits = sum(int(run_ptl(x[i : i + 1].contiguous()).argmax(1)) == labels_of[j] for i, j in enumerate(test))
    return (
        f"| {kind} | {len(snapshot)} / {len(classes)} | {version.image_size} px | {len(test)} | "
        f"{100 * hits / len(test):.1f} % | {recorded:.1f} % | {seconds:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="digits,glyphs,documents")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated row names")
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--count", type=int, default=1000, help="pictures per kind")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="training steps in bfloat16 autocast (evaluation float32)")
    parser.add_argument("--click", action="store_true", help="the default manual click per kind instead")
    parser.add_argument("--before", action="store_true", help="with --click: the previous recipe")
    args = parser.parse_args()
    if args.click:
        os.environ.update(EXPORT_FORMATS="ptl", WEIGHTS_DOWNLOAD="false")
        if args.before:
            recipes.RECIPE = BASELINE
        print(f"default click, {'previous' if args.before else 'new'} recipe, load {os.getloadavg()[0]:.1f}")
        print("| data | pictures / categories | image size (auto) | held out | .ptl accuracy | recorded | time |")
        print("|---|---|---|---:|---:|---:|---:|")
        for kind in args.kinds.split(","):
            print(click(kind, args.count), flush=True)
        return
    kinds, names = args.kinds.split(","), args.variants.split(",")
    print(
        f"{args.architecture}, {args.size} px, {args.count} pictures per kind (80 % train, 20 % held out), "
        f"{args.epochs} epochs, batch {args.batch_size}, lr {args.learning_rate}, seed {args.seed}, "
        f"{'bfloat16 autocast' if args.bf16 else 'float32'}, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {}
    with ProcessPoolExecutor(args.processes) as pool:
        futures = [pool.submit(run, kind, name, VARIANTS[name], args) for name in names for kind in kinds]
        for future in as_completed(futures):
            kind, name, acc, sec = future.result()
            results[(kind, name)] = (acc, sec)
            print(f"{kind:10} {name:22} {acc:5.1f} %  ({sec:.0f} s)", flush=True)
    print("| recipe | " + " | ".join(kinds) + " | mean |")
    print("|---|" + "---:|" * (len(kinds) + 1))
    for name in names:
        accs = [results[(kind, name)][0] for kind in kinds]
        cells = " | ".join(f"{a:.1f} %" for a in accs)
        print(f"| {name} | {cells} | {sum(accs) / len(accs):.1f} % |")
    print(f"{sum(sec for _, sec in results.values()):.0f} s of training in all; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
