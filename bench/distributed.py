"""The same job in 1 and in 2 processes (PyTorch DDP; gloo on the CPU):
validation accuracy, wall time, time in epochs and the device recorded.

    .venv/bin/python -m bench.distributed [--per-category 40] [--size 32] [--epochs 5]

Each job trains from scratch on the same demo images with the same seed; the
wall time includes starting the ranks, loading the images and the export.
"""

import argparse
import time

from bench.common import fresh_data_dir, load_average


def run_job(params: dict) -> dict:
    """Train one round to a version in this process (the queue worker's call); its figures."""
    from core.db import session_scope
    from core.training.rounds import epoch_metrics, get_round, run_training_round, start_training

    started = time.perf_counter()
    with session_scope() as session:
        round_ = start_training(params, session=session)
    with session_scope() as session:
        version = run_training_round(round_.id, session=session)
        done = get_round(round_.id, session=session)
        assert version is not None, done.error
        epochs = epoch_metrics(round_.id, session=session)
        return {
            "device": done.device,
            "val_accuracy": version.metrics["val_accuracy"],
            "wall_s": time.perf_counter() - started,
            "epoch_s": [m.seconds for m in epochs],
            "formats": sorted(a["format"] for a in version.artifacts),
        }


def show(figures: dict) -> str:
    return (
        f"{figures['device']}: val accuracy {figures['val_accuracy']:.1f}%, wall {figures['wall_s']:.1f} s "
        f"({sum(figures['epoch_s']):.1f} s in epochs: {', '.join(f'{s:.2f}' for s in figures['epoch_s'])}), "
        f"exported {', '.join(figures['formats'])}"
    )


def load_demo(per_category: int, size: int) -> None:
    from core.db import session_scope
    from core.demo import load_demo_dataset

    with session_scope() as session:
        load_demo_dataset(session=session, per_category=per_category, size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    fresh_data_dir("distributed")
    load_demo(args.per_category, args.size)
    job = {"epochs": args.epochs, "batch_size": 16, "learning_rate": 0.002, "image_size": args.size}
    for processes in args.processes:
        print(f"load average {load_average():.2f}", flush=True)
        figures = run_job({**job, "use_existing_model": False, "processes": processes})
        print(f"{processes} process(es): {show(figures)}", flush=True)


if __name__ == "__main__":
    main()
