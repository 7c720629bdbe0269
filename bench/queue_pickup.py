"""Queue pickup: seconds from enqueue to `in_progress` for jobs sent to an
idle consumer, one at a time (each job is cancelled once it has started).

    .venv/bin/python -m bench.queue_pickup [--jobs 20]
"""

import argparse
import time
from datetime import UTC, datetime

from bench.common import fresh_data_dir, load_average, percentile, start_worker, stop, wait_until


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    data_dir = fresh_data_dir("queue")
    from core.access import Actor, Role
    from core.db import read_session, session_scope
    from core.demo import load_demo_dataset
    from core.models import FINISHED_STATUSES, TrainingRound, as_utc
    from jobs import cancel_training, submit_training

    with session_scope() as session:
        load_demo_dataset(session=session, per_category=10, size=32)
    worker = start_worker(data_dir)
    latencies = []
    try:
        time.sleep(8)  # imports done, the consumer idles
        for _ in range(args.jobs):
            sent = datetime.now(UTC)
            round_ = submit_training(
                {"epochs": 50, "image_size": 32, "batch_size": 8}, actor=Actor("bench", Role.operator)
            )

            def started(round_id=round_.id):
                with read_session() as s:
                    return s.get(TrainingRound, round_id).started_at

            latencies.append((as_utc(wait_until(started, 60, 0.01)) - sent).total_seconds())
            cancel_training(round_.job_id, actor=Actor("bench", Role.operator))

            def finished(round_id=round_.id):
                with read_session() as s:
                    return s.get(TrainingRound, round_id).status in FINISHED_STATUSES

            wait_until(finished, 60)
            time.sleep(0.5)  # the consumer is idle again
    finally:
        stop(worker)
    print(
        f"pickup over {len(latencies)} jobs: p50 {percentile(latencies, 50):.3f} s, "
        f"p95 {percentile(latencies, 95):.3f} s, max {max(latencies):.3f} s; load average {load_average():.2f}"
    )


if __name__ == "__main__":
    main()
