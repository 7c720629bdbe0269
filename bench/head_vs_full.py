"""`head` against `full` mode: wall time of a job (default 300 images at
224 px), and each one's validation accuracy.

    .venv/bin/python -m bench.head_vs_full [--full-epochs 3]
    .venv/bin/python -m bench.head_vs_full --per-category 300 --picture-size 64 --image-size 64   # issue 19

`full` trains first (from scratch: there are no ImageNet weights here) and
becomes production; the `head` job then retrains on top of it, 20 epochs.
`full` may run fewer epochs to stay short; its 20-epoch time is extrapolated
from its measured set-up, per-epoch and export times, and printed as such.

Each job gives two times: to a downloadable model (start_training to the
commit of the version with its first verified file: the round's
`finished_at`), and to the job's end (its last file, the `.pte`, added).
"""

import argparse
import time

from bench.common import fresh_data_dir, load_average


def run(params: dict) -> tuple[float, float, dict, list[float], float]:
    from sqlmodel import select

    from core.db import session_scope
    from core.models import EpochMetric, TrainingRound
    from core.training.rounds import run_training_round, start_training

    started = time.perf_counter()
    with session_scope() as session:
        round_ = start_training(params, session=session)
        created = round_.created_at
    with session_scope() as session:
        version = run_training_round(round_.id, session=session)
        assert version is not None, session.get(TrainingRound, round_.id).error
        epochs = session.exec(select(EpochMetric).where(EpochMetric.round_id == round_.id)).all()
        metrics = dict(version.metrics)
        last_epoch_at = max(e.created_at for e in epochs)
        finished = session.get(TrainingRound, round_.id).finished_at
    wall = time.perf_counter() - started
    downloadable = (finished - created).total_seconds()
    return wall, downloadable, metrics, [e.seconds for e in epochs], (finished - last_epoch_at).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--full-epochs", type=int, default=20)
    parser.add_argument("--head-epochs", type=int, default=20)
    parser.add_argument("--per-category", type=int, default=60, help="demo pictures per category (5 categories)")
    parser.add_argument("--picture-size", type=int, default=96, help="the demo pictures' side, px")
    parser.add_argument("--image-size", type=int, default=224, help="the jobs' input size, px")
    args = parser.parse_args()
    fresh_data_dir("head")
    from core.db import session_scope
    from core.demo import load_demo_dataset

    with session_scope() as session:
        load_demo_dataset(session=session, per_category=args.per_category, size=args.picture_size)
    common = {"architecture": args.architecture, "image_size": args.image_size, "batch_size": 32}
    print(f"load average {load_average():.2f}")
    full_wall, full_ready, full_metrics, full_epochs, full_tail = run({**common, "epochs": args.full_epochs})
    per_epoch = sum(full_epochs) / len(full_epochs)
    full_20 = full_wall + (20 - len(full_epochs)) * per_epoch
    full_ready_20 = full_ready + (20 - len(full_epochs)) * per_epoch
    print(
        f"full: {full_wall:.1f} s for {len(full_epochs)} epochs ({per_epoch:.1f} s/epoch, "
        f"{full_ready - sum(full_epochs) - full_tail:.1f} s before the first epoch, {full_tail:.1f} s from the last epoch to the commit), "
        f"downloadable after {full_ready:.1f} s, val accuracy {full_metrics['val_accuracy']}%; "
        f"20 epochs: {full_20:.1f} s, downloadable after {full_ready_20:.1f} s"
        + (" (extrapolated)" if len(full_epochs) < 20 else "")
    )
    print(f"load average {load_average():.2f}")
    head_wall, head_ready, head_metrics, head_epochs, head_tail = run(
        {**common, "epochs": args.head_epochs, "training_mode": "head"}
    )
    print(
        f"head: {head_wall:.1f} s for {len(head_epochs)} epochs ({sum(head_epochs):.2f} s in epochs, "
        f"{head_ready - sum(head_epochs) - head_tail:.1f} s before the first epoch incl. features, "
        f"{head_tail:.1f} s from the last epoch to the commit), downloadable after {head_ready:.1f} s, val accuracy {head_metrics['val_accuracy']}%"
    )
    print(
        f"speed-up full/head (20 epochs each): to a downloadable model {full_ready_20 / head_ready:.1f}x, "
        f"to the job's end {full_20 / head_wall:.1f}x; load average {load_average():.2f}"
    )


if __name__ == "__main__":
    main()
