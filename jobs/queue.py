"""Huey on SQLite (in DATA_DIR); tasks take ids and call `core`."""

import logging
from collections.abc import Mapping

from huey import SqliteHuey

from core import training
from core.config import get_settings
from core.db import session_scope
from core.models import TrainingRound

log = logging.getLogger(__name__)


def make_huey() -> SqliteHuey:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Job state lives in the database (TrainingRound), not in Huey's results.
    return SqliteHuey("training", filename=str(settings.queue_path), results=False, timeout=30)


huey = make_huey()


def bind_storage() -> None:
    """Point the queue at the file the current settings name (tests change DATA_DIR)."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    huey.storage_kwargs["filename"] = str(settings.queue_path)
    huey.storage = huey.create_storage()


@huey.task(retries=get_settings().training_retries, retry_delay=1, context=True)
def run_training_job(round_id: int, task=None) -> None:
    """Train one round; Huey retries it, the last attempt marks it failed."""
    final = task is None or task.retries == 0
    with session_scope() as session:
        training.run_training_round(round_id, session=session, final_attempt=final)


def submit_training(params: Mapping | None, *, requested_by: str | None = None) -> TrainingRound:
    """Validate, snapshot and enqueue a training round; returns it (queued)."""
    with session_scope() as session:
        round_ = training.start_training(params, session=session, requested_by=requested_by)
        task = run_training_job.s(round_.id)
        round_.queue_task_id = task.id
        session.add(round_)
    # Enqueued only once the round is committed, so the worker always finds it.
    huey.enqueue(task)
    return round_


def cancel_training(job_id: str, *, by: str | None = None) -> TrainingRound:
    """Cancel a queued job (it will never start) or ask a running one to stop."""
    with session_scope() as session:
        return training.request_cancel(job_id, session=session, by=by)
