"""Training data that streams (issue 19): the peak memory of a process
training a round on N pictures at 224 px with the images held in memory
against read from the round's image file batch by batch, and the training
throughput of each (the round's own epoch timings, validation included).

    .venv/bin/python -m bench.streaming --n 50000                 # the issue's figure, trained in full
    .venv/bin/python -m bench.streaming --n 2000 --n 6000         # two sizes: what each picture adds
    .venv/bin/python -m bench.streaming --n 50000 --modes streamed --batches 200

`--batches K` cancels each round once it has trained K batches of its
first epoch: the peak memory of the set-up (every picture decoded into the
round's image file) and of steady training, where a full epoch of 40,000
pictures at 224 px would take hours on 2 cores; no epoch timing then.

For each N: N demo pictures (5 categories) are imported, then one round per
mode runs in its own process (`run_training_round`, as a worker runs it),
with TRAINING_IMAGES_MAX_BYTES set to force the mode; that process reports
its peak resident memory (ru_maxrss). The in-memory round runs first and
decodes the pictures into the cache's files; the streamed round reads them
from there into its image file (decoding is not in the epoch timings).
"""

import argparse
import os
import resource
import subprocess
import sys
import threading
import time

from bench.common import ROOT, fresh_data_dir, load_average

MODES = {"in memory": str(2**62), "streamed": "0"}


def child(round_id: int, batches: int | None) -> None:
    from core.db import session_scope
    from core.models import TrainingRound
    from core.training.rounds import request_cancel, run_training_round

    def cancel_after_batches() -> None:
        # As the dashboard's Cancel does (request_cancel), once the round is that far.
        while True:
            time.sleep(1)
            try:
                with session_scope() as session:
                    round_ = session.get(TrainingRound, round_id)
                    if (round_.current_batch or 0) >= batches:
                        request_cancel(round_.job_id, session=session, by="bench.streaming --batches")
                        print(f"cancel requested at batch {round_.current_batch}", flush=True)
                        return
            except Exception as exc:
                print(f"cancel check failed: {exc!r}", flush=True)

    if batches:
        threading.Thread(target=cancel_after_batches, daemon=True).start()
    started = time.perf_counter()
    with session_scope() as session:
        version = run_training_round(round_id, session=session)
        assert version is not None or batches, "the round failed"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {peak:.0f} {time.perf_counter() - started:.1f}", flush=True)


def measure(data_dir, params: dict, limit: str, threads: int, batches: int | None) -> tuple[float, float, float]:
    """(peak resident MB, images/s over the epochs (NaN when stopped early),
    seconds of the whole job) of one round in its own process."""
    from sqlmodel import select

    from core.db import session_scope
    from core.models import EpochMetric, ModelVersion
    from core.training.rounds import start_training

    with session_scope() as session:
        round_id = start_training(params, session=session).id
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "TRAINING_IMAGES_MAX_BYTES": limit,
        "EXPORT_FORMATS": "ptl",
        "AUTO_PROMOTE": "never",
        "TORCH_THREADS": str(threads),
    }
    out = subprocess.run(
        [sys.executable, "-m", "bench.streaming", "--child", str(round_id), "--batches", str(batches or 0)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    for said in (x for x in out.stdout.splitlines() if x.startswith("cancel ")):
        print(f"    {said}")
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the training process failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    peak, wall = map(float, line.split()[1:])
    if batches:
        return peak, float("nan"), wall
    with session_scope() as session:
        epochs = session.exec(select(EpochMetric).where(EpochMetric.round_id == round_id)).all()
        version = session.exec(select(ModelVersion).where(ModelVersion.round_id == round_id)).one()
        train_images = version.metrics["train_images"]
    return peak, train_images * len(epochs) / sum(e.seconds for e in epochs), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, action="append", help="pictures (repeat for several sizes)")
    parser.add_argument("--size", type=int, default=224, help="the rounds' input size, px")
    parser.add_argument("--picture-size", type=int, default=96, help="the demo pictures' side, px")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of the training process")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--batches", type=int, help="cancel each round after this many batches (memory only)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.batches)
        return
    params = {"epochs": args.epochs, "image_size": args.size, "batch_size": 32,
              "architecture": args.architecture, "use_existing_model": False}  # fmt: skip
    for n in args.n or [50_000]:
        data_dir = fresh_data_dir("streaming")
        from core.db import session_scope
        from core.demo import load_demo_dataset

        started = time.perf_counter()
        with session_scope() as session:
            load_demo_dataset(session=session, per_category=n // 5, size=args.picture_size)
        print(f"{n} pictures imported in {time.perf_counter() - started:.0f} s; load average {load_average():.2f}")
        for mode in args.modes:
            peak, rate, wall = measure(data_dir, params, MODES[mode], args.threads, args.batches)
            print(
                f"  {n} pictures at {args.size} px, {mode:9}: peak resident {peak:6.0f} MB, "
                f"{rate:5.1f} training images/s over the epochs (validation included), job {wall:.0f} s; "
                f"load average {load_average():.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
