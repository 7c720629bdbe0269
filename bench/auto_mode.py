"""Auto mode against the best of the three architectures trained by hand, in the same time.

    TORCH_THREADS=1 python -m bench.auto_mode [--kinds digits,glyphs,documents --budget 10 --train 1300 --held-out 300 --by-hand ARCHS]

For each kind of picture (bench/datasets.py, 10 categories each), `--train`
pictures go into a fresh DATA_DIR as validated images, and `--held-out` more
are kept aside: no round ever sees them. Then, in this process, from scratch
(no pretrained weights):

- one Auto round with `budget_minutes` = `--budget`;
- one round per architecture with the seed defaults (20 epochs, image size
  auto), stopped after `--budget` minutes of training with "stop and keep
  the best" if it has not finished by then.

Each round's downloaded `.ptl` (as a phone gets it, run in the lite
interpreter) is scored on the held-out pictures; the script prints the
accuracy and the seconds from start to version of each, and what Auto chose.
"""

import argparse
import io
import os
import threading
import time

import torch

from bench.common import fresh_data_dir, load_average


def pictures(kind: str, count: int):
    """`count` pictures of 10 categories of `kind`, in a fixed shuffled order."""
    import random

    from bench import datasets

    if kind == "digits":
        images, labels = datasets.digits()
    elif kind == "glyphs":
        # Each letter once per installed font is 380 pictures of 10 letters:
        # four renderings (size, offset, slant drawn anew per seed) make enough.
        keep = set(datasets.LETTERS[:10])
        images, labels = [], []
        for seed in range(4):
            for image, label in zip(*datasets.glyphs(n=5000, seed=seed), strict=True):
                if label in keep:
                    images.append(image)
                    labels.append(label)
    else:
        images, labels = datasets.documents(n=count)
    pairs = list(zip(images, labels, strict=True))
    random.Random(0).shuffle(pairs)
    return pairs[:count]


def store(pairs) -> None:
    from bench.datasets import png
    from core.db import session_scope
    from core.ingest import NewFile, ingest_files
    from core.models import ImageStatus

    files = (NewFile(png(image.convert("RGB")), f"{n}.png", label) for n, (image, label) in enumerate(pairs))
    with session_scope() as session:
        ingest_files(files, session=session, status=ImageStatus.validated)


def held_out_accuracy(version, pairs) -> float:
    """Accuracy (%) of the version's downloaded `.ptl` on pictures it never saw."""
    from bench.datasets import png
    from core.config import get_settings
    from core.dataset import decode_image, normalize
    from core.export import load_runner

    ptl = next(a for a in version.artifacts if a["format"] == "ptl")
    run = load_runner(get_settings().data_dir / ptl["path"], "ptl")
    right = 0
    for image, label in pairs:
        x = normalize(decode_image(io.BytesIO(png(image.convert("RGB"))), version.image_size).unsqueeze(0))
        right += version.classes[int(run(x).argmax(1))] == label
    return 100.0 * right / len(pairs)


def train(params: dict, stop_after: float | None) -> tuple:
    """Queue and run one round here; with `stop_after` seconds, ask it to stop
    and keep its best epoch then. Returns (version, seconds, round)."""
    from core import registry
    from core.db import session_scope
    from core.training import rounds as training

    with session_scope() as session:
        round_ = training.start_training(params, session=session, requested_by="bench")
        job_id, round_id = round_.job_id, round_.id
    timer = None
    if stop_after is not None:

        def stop() -> None:
            with session_scope() as session:
                try:
                    training.request_stop(job_id, session=session, by="bench")
                except Exception:  # it finished first
                    pass

        timer = threading.Timer(stop_after, stop)
        timer.start()
    started = time.perf_counter()
    with session_scope() as session:
        training.run_training_round(round_id, session=session)
    seconds = time.perf_counter() - started
    if timer is not None:
        timer.cancel()
    with session_scope() as session:
        done = training.get_round(round_id, session=session)
        version = registry.get_version_by_id(done.model_version_id, session=session)
    return version, seconds, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="digits,glyphs,documents")
    parser.add_argument("--budget", type=float, default=10.0, help="minutes")
    parser.add_argument("--train", type=int, default=1300)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument(
        "--by-hand",
        default=None,
        help="architectures to train by hand, comma-separated (default: all three; '' for Auto alone)",
    )
    args = parser.parse_args()
    os.environ.setdefault("EXPORT_FORMATS", "ptl")
    os.environ["WEIGHTS_DOWNLOAD"] = "false"  # from scratch, as on a machine without the weights
    os.environ["AUTO_PROMOTE"] = "never"
    from core.training.config import ARCHITECTURES

    print(f"budget {args.budget:g} min, {torch.get_num_threads()} thread(s), load {load_average():.1f}")
    for kind in args.kinds.split(","):
        pairs = pictures(kind, args.train + args.held_out)
        train_pairs, held_out = pairs[: args.train], pairs[args.train :]
        fresh_data_dir(f"auto-{kind}")
        store(train_pairs)
        print(f"\n{kind}: {len(train_pairs)} training pictures, {len(held_out)} held out, 10 categories")
        results = {}
        version, seconds, done = train(
            {"training_mode": "auto", "budget_minutes": args.budget, "use_existing_model": False}, None
        )
        results["auto"] = held_out_accuracy(version, held_out)
        kept = sum(row["state"] == "kept" for row in done.trials)
        pruned = sum(row["state"] == "pruned" for row in done.trials)
        print(
            f"  auto: held-out {results['auto']:.1f}% in {seconds:.0f} s; {len(done.trials)} trials "
            f"({kept} kept, {pruned} pruned); chose {done.parameters['architecture']} "
            f"lr {done.parameters['learning_rate']:.2g} {done.parameters['image_size']} px, "
            f"{done.parameters['epochs']} epochs",
            flush=True,
        )
        hand = ARCHITECTURES if args.by_hand is None else [a for a in args.by_hand.split(",") if a]
        for architecture in hand:
            version, seconds, done = train(
                {"architecture": architecture, "use_existing_model": False}, args.budget * 60
            )
            results[architecture] = held_out_accuracy(version, held_out)
            print(
                f"  {architecture} by hand: held-out {results[architecture]:.1f}% in {seconds:.0f} s "
                f"({version.metrics.get('epochs_trained')} epochs, {done.parameters['image_size']} px)",
                flush=True,
            )
        if not hand:
            continue
        best = max(hand, key=results.get)
        print(f"  auto {results['auto']:.1f}% against the best by hand ({best}) {results[best]:.1f}%")


if __name__ == "__main__":
    main()
