"""The job queue: a Huey instance and thin task wrappers around `core`."""

from jobs.queue import (
    cancel_training,
    enqueue_missing_rounds,
    huey,
    queue_health,
    run_automatic_check,
    run_training_job,
    submit_training,
)

__all__ = [
    "cancel_training",
    "enqueue_missing_rounds",
    "huey",
    "queue_health",
    "run_automatic_check",
    "run_training_job",
    "submit_training",
]
