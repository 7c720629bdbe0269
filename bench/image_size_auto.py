"""Time to model with image_size auto against 224 px, on the same small pictures.

    TORCH_THREADS=1 python -m bench.image_size_auto [--per-category 40 --size 64 --epochs 3]

Loads the demo drawings at `--size` px into a fresh DATA_DIR, then trains one
round with image_size auto (which picks the pictures' own size) and one at
224 px, each from scratch with the seed defaults but `--epochs`, in this
process, and prints the seconds from start to registered version and the
test accuracy of each.
"""

import argparse
import os
import time

from bench.common import fresh_data_dir, load_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("EXPORT_FORMATS", "ptl")
    os.environ["WEIGHTS_DOWNLOAD"] = "false"  # from scratch, as on a machine without the weights
    fresh_data_dir("image-size")

    from core.db import session_scope
    from core.demo import load_demo_dataset
    from core.training.rounds import run_training_round, start_training

    with session_scope() as session:
        load_demo_dataset(session=session, per_category=args.per_category, size=args.size)
    print(f"{5 * args.per_category} demo pictures at {args.size} px, {args.epochs} epochs, load {load_average():.1f}")
    for image_size in ("auto", 224):
        params = {"epochs": args.epochs, "image_size": image_size, "use_existing_model": False}
        with session_scope() as session:
            round_id = start_training(params, session=session).id
        started = time.perf_counter()
        with session_scope() as session:
            version = run_training_round(round_id, session=session)
            seconds = time.perf_counter() - started
            print(
                f"image_size {image_size!s:>4} -> {version.image_size:>3} px: {seconds:6.1f} s to model "
                f"{version.version}, test accuracy {version.metrics['test_accuracy']:.1f}%"
            )


if __name__ == "__main__":
    main()
