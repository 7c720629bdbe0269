"""Huey on SQLite (in DATA_DIR); tasks take ids and call `core`."""

import logging
import uuid
from collections.abc import Mapping

from huey import Huey, crontab
from huey.api import Task
from huey.storage import RedisStorage, SqliteStorage
from sqlmodel import Session

from core import automation
from core.access import SYSTEM_ACTOR, Actor, Permission, require
from core.audit import record_audit
from core.config import get_settings
from core.db import read_session, session_scope
from core.models import TrainingRound
from core.training.rounds import (
    get_round,
    missing_from_queue,
    recover_stale_rounds,
    replace_queue_task,
    request_cancel,
    request_stop,
    run_training_round,
    start_training,
)

log = logging.getLogger(__name__)


def _storage_options() -> dict:
    settings = get_settings()
    if settings.queue_url:
        return {"url": settings.queue_url}
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return {"filename": str(settings.queue_path), "timeout": 30}


def make_huey() -> Huey:
    """SQLite storage in DATA_DIR by default; Redis when QUEUE_URL is set."""
    storage = RedisStorage if get_settings().queue_url else SqliteStorage
    # Job state lives in the database (TrainingRound), not in Huey's results.
    return Huey("training", results=False, storage_class=storage, **_storage_options())


huey = make_huey()


def bind_storage() -> None:
    """Point the queue at the storage the current settings name (tests change DATA_DIR)."""
    huey.storage_class = RedisStorage if get_settings().queue_url else SqliteStorage
    huey.storage_kwargs = _storage_options()
    huey.storage = huey.create_storage()


@huey.task(retries=get_settings().training_retries, retry_delay=1, context=True)
def run_training_job(round_id: int, task: Task | None = None) -> None:
    """Train one round. It raises only when core wants a retry; core counts
    the attempts (crash recovery re-enqueues too) and fails the last one. A
    task the sweeper replaced does nothing (its id is no longer the round's)."""
    with session_scope() as session:
        run_training_round(round_id, session=session, task_id=task.id if task else None)


def queued_task_ids() -> set[str]:
    """Ids of the training tasks the queue holds: waiting, or scheduled (a retry)."""
    return {t.id for t in (*huey.pending(), *huey.scheduled()) if t.name == run_training_job.task_class.__name__}


def enqueue_missing_rounds() -> list[int]:
    """The outbox sweep: a round is recorded (`queued`) before its task is put
    on the queue, so a queue that was unwritable at that moment, or lost
    since, leaves rounds no consumer will ever see. Give each such round a new
    task, once (core.training.rounds.replace_queue_task), and enqueue it; returns
    their ids. Runs on every worker start and then periodically."""
    present = queued_task_ids()
    with session_scope() as session:
        missing = [(r.id, r.queue_task_id) for r in missing_from_queue(present, session=session)]
    enqueued = []
    for round_id, old in missing:
        task = run_training_job.s(round_id)
        with session_scope() as session:
            claimed = replace_queue_task(round_id, old, task.id, session=session)
        if claimed:
            huey.enqueue(task)
            enqueued.append(round_id)
            log.warning("round %s was queued but missing from the queue; enqueued it (task %s)", round_id, task.id)
    return enqueued


def queue_health() -> dict:
    """Whether the queue can be written now, and whether it holds a task for
    every round the database says is queued (and past the sweeper's grace)."""
    probe = f"health-{uuid.uuid4().hex}"
    huey.storage.put_data(probe, b"1")
    huey.storage.pop_data(probe)
    present = queued_task_ids()
    with read_session() as session:
        missing = missing_from_queue(present, session=session)
    return {"queued_jobs": len(present), "missing_from_queue": len(missing)}


def requeue_stale_rounds() -> list[int]:
    """Re-enqueue (or fail) rounds with a stale heartbeat; returns the re-enqueued ids."""
    with session_scope() as session:
        round_ids = recover_stale_rounds(session=session)
        tasks = {round_id: run_training_job.s(round_id) for round_id in round_ids}
        for round_id, task in tasks.items():
            round_ = session.get(TrainingRound, round_id)
            round_.queue_task_id = task.id
            session.add(round_)
    for task in tasks.values():
        huey.enqueue(task)
    for round_id in round_ids:
        log.warning("round %s lost its worker; re-enqueued to resume from its checkpoint", round_id)
    return round_ids


def _queue_task(round_: TrainingRound, *, session: Session, actor: Actor) -> Task:
    """Give a new round its queue task and audit its start, in the caller's
    transaction. The caller enqueues the task only once that commits, so the
    worker always finds the round."""
    task = run_training_job.s(round_.id)
    round_.queue_task_id = task.id
    session.add(round_)
    after = {"parameters": round_.parameters, "total_images": round_.total_images}
    if round_.trigger:
        after["trigger"] = round_.trigger
    record_audit("training.start", session=session, actor=actor, target=f"job:{round_.job_id}", after=after)
    return task


def submit_training(params: Mapping | None, *, actor: Actor) -> TrainingRound:
    """Validate, snapshot and enqueue a training round; returns it (queued)."""
    require(actor, Permission.train)
    with session_scope() as session:
        round_ = start_training(params, session=session, requested_by=actor.name)
        task = _queue_task(round_, session=session, actor=actor)
    _enqueue_recorded(task, round_)
    return round_


def _enqueue_recorded(task: Task, round_: TrainingRound) -> None:
    """Enqueue the task of a round that is already committed. Should the queue
    refuse it, the round stays recorded and the sweep (`enqueue_missing_rounds`)
    enqueues it once the queue works again: the caller is not told it failed."""
    try:
        huey.enqueue(task)
    except Exception:
        log.exception("could not enqueue round %s; the worker's sweep will enqueue it", round_.id)


def run_automatic_check() -> TrainingRound | None:
    """Check the automatic triggers; when one fires, queue its round (returned).

    The check and the new round share one transaction, which holds the
    automation row's lock: a second consumer checking at the same moment waits,
    then sees the queued automatic round and starts nothing."""
    with session_scope() as session:
        decision = automation.check_triggers(session=session)
        if decision.trigger is None:
            return None
        round_ = start_training(
            automation.get_automation(session=session).parameters,
            session=session,
            requested_by=SYSTEM_ACTOR.name,
            trigger=decision.trigger,
        )
        task = _queue_task(round_, session=session, actor=SYSTEM_ACTOR)
    _enqueue_recorded(task, round_)
    log.info("automatic training job %s queued: %s", round_.job_id, decision.reason)
    return round_


# A check that waited over a minute (its consumer was busy training) is
# dropped: the next one is already queued, so they do not pile up.
@huey.periodic_task(crontab(minute="*"), expires=55)
def check_automatic_training() -> None:
    """Every minute, on every consumer started with periodic tasks (jobs/worker.py)."""
    run_automatic_check()


def cancel_training(job_id: str, *, actor: Actor, keep_best: bool = False) -> TrainingRound:
    """Cancel a queued job (it will never start) or ask a running one to stop;
    with `keep_best`, a running one stops keeping its best epoch so far as a
    version (see `core.training.rounds.request_stop`)."""
    require(actor, Permission.train)
    with session_scope() as session:
        before = get_round(job_id, session=session).status.value
        if keep_best:
            round_ = request_stop(job_id, session=session, by=actor.name)
        else:
            round_ = request_cancel(job_id, session=session, by=actor.name)
        after = {"status": round_.status.value, "cancel_requested": round_.cancel_requested}
        if round_.stop_requested:
            after["stop_requested"] = True
        record_audit(
            "training.stop" if round_.stop_requested else "training.cancel",
            session=session,
            actor=actor,
            target=f"job:{round_.job_id}",
            before={"status": before},
            after=after,
        )
        return round_
