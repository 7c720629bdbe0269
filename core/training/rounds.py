"""A training round's life, as the edges (API, pages, CLI, queue tasks) see
it: start (validate the request and freeze the dataset, status `queued`),
look up, cancel or stop, run (the queue worker's call: train, export,
register, with retries and resume), and the queue's sweeps (stale rounds,
rounds the queue lost).
"""

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta

from sqlalchemy.orm import defer
from sqlmodel import Session, col, select, update

from core import registry
from core.config import get_settings
from core.errors import ConflictError, NotFoundError, TrainingCancelled, UserError
from core.models import FINISHED_STATUSES, EpochMetric, ModelVersion, RoundStatus, TrainingRound, as_utc, utcnow
from core.splits import assign_splits
from core.training import auto
from core.training.config import AUTO, FEDERATED, TrainingConfig
from core.training.federated import run_federated
from core.training.loop import train_and_register
from core.training.placement import Placement
from core.training.preflight import preflight, validated_images
from core.training.progress import Heartbeat, RoundReporter, finish, history_line, round_dir
from core.training.ranks import run_ranks

log = logging.getLogger(__name__)


def snapshot_hash(snapshot: list[dict]) -> str:
    """The SHA-256 of a snapshot's manifest (ids, hashes, labels, split keys)."""
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def start_training(
    params: Mapping | None, *, session: Session, requested_by: str | None = None, trigger: str | None = None
) -> TrainingRound:
    """Validate a request and create a `queued` round with a frozen dataset snapshot.

    `trigger` names the automatic trigger that asked for it (None: a person).
    The caller enqueues the round (see `jobs.submit_training`)."""
    config = TrainingConfig.from_params(params)
    check = preflight(config, session=session)
    if not check.ok:
        raise UserError(" ".join(check.problems))
    requested = config.to_dict()
    if config.training_mode == FEDERATED:
        # The phones fine-tune production's head: its network and input size.
        production = registry.production_version(session=session)
        config = replace(config, architecture=production.architecture, image_size=production.image_size)
    elif config.image_size == AUTO:
        config = replace(config, image_size=check.image_size)
    assign_splits(session=session)  # images stored before split keys existed
    rows = validated_images(session=session)
    snapshot = [{"id": img.id, "sha256": img.sha256, "label": label, "split_key": img.split_key} for img, label in rows]
    round_ = TrainingRound(
        parameters=config.to_dict(),
        requested_parameters=requested,
        requested_by=requested_by,
        trigger=trigger,
        snapshot=snapshot,
        snapshot_hash=snapshot_hash(snapshot),
        total_images=len(snapshot),
        category_distribution=check.per_category,
        classes=sorted(check.per_category),
        warnings=check.notices,
        history=[
            history_line(
                f"queued by {requested_by or 'unknown'}"
                + (f" (automatic trigger: {trigger})" if trigger else "")
                + f" with {len(snapshot)} images"
            )
        ],
    )
    session.add(round_)
    session.flush()
    return round_


# A numeric round id: ASCII digits, few enough for the database's integer column.
ROUND_ID = re.compile(r"[0-9]{1,12}")


def get_round(job_id_or_id: str | int, *, session: Session) -> TrainingRound:
    """A round by public job id (UUID) or numeric id."""
    text = str(job_id_or_id).strip()
    query = select(TrainingRound).where(
        (TrainingRound.job_id == text)
        | (TrainingRound.id == int(text) if ROUND_ID.fullmatch(text) else TrainingRound.job_id == text)
    )
    found = session.exec(query).first()
    if found is None:
        raise NotFoundError(f"No training job with id '{text}'")
    return found


def list_rounds(*, session: Session, limit: int = 50) -> list[TrainingRound]:
    """The newest rounds first."""
    # Listed without their snapshots (every image of a round's dataset, megabytes at 200,000).
    query = select(TrainingRound).options(defer(TrainingRound.snapshot, raiseload=True))
    return list(session.exec(query.order_by(col(TrainingRound.id).desc()).limit(limit)))


def epoch_metrics(round_id: int, *, session: Session) -> list[EpochMetric]:
    """A round's metric rows, by epoch."""
    return list(session.exec(select(EpochMetric).where(EpochMetric.round_id == round_id).order_by(EpochMetric.epoch)))


def request_cancel(job_id: str, *, session: Session, by: str | None = None) -> TrainingRound:
    """Cancel a queued round now, or ask a running one to stop after its batch."""
    round_ = get_round(job_id, session=session)
    if round_.status in FINISHED_STATUSES:
        raise ConflictError(
            f"Job {round_.job_id} is already {round_.status.value}; only queued or running jobs can be cancelled"
        )
    round_.cancel_requested = True
    if round_.status == RoundStatus.queued:
        finish(
            round_,
            RoundStatus.cancelled,
            f"cancelled by {by or 'unknown'} before it started",
        )
    else:
        round_.history = [
            *round_.history,
            history_line(f"cancel requested by {by or 'unknown'}"),
        ]
    session.add(round_)
    session.flush()
    return round_


def request_stop(job_id: str, *, session: Session, by: str | None = None) -> TrainingRound:
    """Stop and keep the best so far: a running round ends training after
    its current batch (once one epoch has been validated) and registers its
    best epoch as a version, through the gate; a queued one has nothing to
    keep and is cancelled."""
    round_ = get_round(job_id, session=session)
    if round_.status == RoundStatus.queued:
        return request_cancel(job_id, session=session, by=by)
    if round_.status in FINISHED_STATUSES:
        raise ConflictError(f"Job {round_.job_id} is already {round_.status.value}; only a running job can be stopped")
    round_.stop_requested = True
    round_.history = [
        *round_.history,
        history_line(f"stop requested by {by or 'unknown'}: keeping the best epoch so far"),
    ]
    session.add(round_)
    session.flush()
    return round_


def max_attempts() -> int:
    """Attempts a round gets: the first and TRAINING_RETRIES more."""
    return 1 + get_settings().training_retries


def run_training_round(round_id: int, *, session: Session, task_id: str | None = None) -> ModelVersion | None:
    """Train one queued round to a registered ModelVersion.

    Commits as it goes (progress, epoch rows, checkpoints), since other
    processes watch the round, and resumes from the round's last checkpoint
    when an earlier attempt got that far. On error the round goes back to
    `queued` and the error is re-raised (the queue retries it), unless this
    was the last of `1 + TRAINING_RETRIES` attempts: then it is marked
    `failed`. Returns None when the round was cancelled, failed or had
    already finished, or when `task_id` (the queue task delivering it) is not
    the round's current one: the sweeper replaced it (`missing_from_queue`)."""
    # Locked (PostgreSQL) so a second delivery of the same job waits here and
    # then sees it running; SQLite's write lock does the same.
    round_ = session.exec(select(TrainingRound).where(TrainingRound.id == round_id).with_for_update()).first()
    if round_ is None:
        raise NotFoundError(f"No training round {round_id}")
    if round_.status in FINISHED_STATUSES:
        return None
    if task_id is not None and round_.queue_task_id not in (None, task_id):
        log.warning("round %s: task %s was replaced by %s; ignoring it", round_id, task_id, round_.queue_task_id)
        session.rollback()
        return None
    if round_.status == RoundStatus.in_progress and not _is_stale(round_):
        log.warning("round %s is already running elsewhere; ignoring a duplicate delivery", round_id)
        session.rollback()
        return None
    if round_.cancel_requested:
        finish(round_, RoundStatus.cancelled, "cancelled before it started")
        session.add(round_)
        session.commit()
        return None
    round_.status = RoundStatus.in_progress
    round_.attempts += 1
    round_.started_at = round_.started_at or utcnow()
    round_.heartbeat_at = utcnow()
    round_.error = None
    round_.history = [*round_.history, history_line(f"attempt {round_.attempts} of {max_attempts()} started")]
    session.add(round_)
    session.commit()
    try:
        with Heartbeat(round_.id, session.get_bind(), get_settings().heartbeat_interval):
            if round_.parameters.get("training_mode") == AUTO:
                # Auto mode: the search turns the round's parameters into the
                # winner's (`full` mode), which then trains as any round does.
                auto.search(round_, RoundReporter(round_, session), session=session)
            if round_.parameters.get("processes", 1) > 1:
                return _train_in_ranks(round_, session=session)
            reporter = RoundReporter(round_, session)
            if round_.parameters.get("training_mode") == FEDERATED:
                return run_federated(round_, reporter, session=session)
            return train_and_register(round_, reporter, Placement.local(), session=session)
    except TrainingCancelled:
        session.rollback()
        finish(round_, RoundStatus.cancelled, "cancelled while training; no model was made")
        session.add(round_)
        session.commit()
        return None
    except Exception as exc:
        session.rollback()
        round_.error = f"{type(exc).__name__}: {exc}"
        log.exception("round %s attempt %s failed", round_.id, round_.attempts)
        if round_.attempts >= max_attempts():
            finish(round_, RoundStatus.failed, f"attempt {round_.attempts} failed, giving up: {round_.error}")
            session.add(round_)
            session.commit()
            return None
        round_.status = RoundStatus.queued
        round_.history = [
            *round_.history,
            history_line(f"attempt {round_.attempts} failed, will retry: {round_.error}"),
        ]
        session.add(round_)
        session.commit()
        raise


def _train_in_ranks(round_: TrainingRound, *, session: Session) -> ModelVersion:
    """The training part in `processes` DDP ranks (see `core.training.ranks`);
    rank 0 writes the round's progress, history and outcome itself."""
    try:
        run_ranks(round_.id, round_.parameters["processes"])
    except Exception:
        session.refresh(round_)
        # A rank that failed after rank 0 committed the version changes nothing.
        if round_.status != RoundStatus.completed:
            raise
    session.refresh(round_)
    version = session.get(ModelVersion, round_.model_version_id)
    session.commit()
    return version


def _is_stale(round_: TrainingRound) -> bool:
    if round_.heartbeat_at is None:
        return True
    age = utcnow() - as_utc(round_.heartbeat_at)
    return age > timedelta(seconds=get_settings().heartbeat_timeout)


def recover_stale_rounds(*, session: Session) -> list[int]:
    """Rounds `in_progress` whose worker died (stale heartbeat): put them back
    in the queue to resume from their checkpoint, or fail them when no attempt
    is left. Returns the ids to enqueue again; the caller commits."""
    cutoff = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout)
    # FOR UPDATE: two consumers checking at once must not both re-enqueue a round.
    stale = session.exec(
        select(TrainingRound)
        .where(TrainingRound.status == RoundStatus.in_progress, TrainingRound.heartbeat_at < cutoff)
        .with_for_update()
    ).all()
    requeue = []
    for round_ in stale:
        seen = f"{round_.heartbeat_at:%H:%M:%S}Z" if round_.heartbeat_at else "never"
        lost = f"worker lost during attempt {round_.attempts} (last heartbeat {seen})"
        if round_.attempts >= max_attempts():
            round_.error = f"{lost}; no attempts left"
            finish(round_, RoundStatus.failed, round_.error)
        else:
            checkpoint = round_dir(round_) / "checkpoint.pt"
            where = "its last checkpoint" if checkpoint.is_file() else "the start (no checkpoint yet)"
            round_.status = RoundStatus.queued
            round_.history = [*round_.history, history_line(f"{lost}; re-enqueued to resume from {where}")]
            requeue.append(round_.id)
        session.add(round_)
    session.flush()
    return requeue


def missing_from_queue(task_ids: set[str], *, session: Session, grace: float | None = None) -> list[TrainingRound]:
    """`queued` rounds whose queue task is not among `task_ids` (what the queue
    holds, waiting or scheduled for a retry): the queue lost them, or was not
    writable when they were recorded. Rounds queued in the last `grace`
    seconds (default HEARTBEAT_TIMEOUT) are left alone, since their task may
    be on its way in (or just taken out by a consumer)."""
    grace = get_settings().heartbeat_timeout if grace is None else grace
    cutoff = utcnow() - timedelta(seconds=grace)
    rounds = session.exec(select(TrainingRound).where(TrainingRound.status == RoundStatus.queued)).all()
    return [
        r
        for r in rounds
        if r.queue_task_id not in task_ids
        and max(as_utc(r.created_at), as_utc(r.heartbeat_at or r.created_at)) < cutoff
    ]


def replace_queue_task(round_id: int, old: str | None, new: str, *, session: Session) -> bool:
    """Give a still-queued round the task `new` in place of `old`; False when
    someone else changed it first. A compare-and-set, so two sweepers running
    at once enqueue a lost round once, not twice."""
    changed = session.exec(
        update(TrainingRound)
        .where(
            TrainingRound.id == round_id,
            TrainingRound.status == RoundStatus.queued,
            col(TrainingRound.queue_task_id) == old if old is not None else col(TrainingRound.queue_task_id).is_(None),
        )
        .values(queue_task_id=new)
    )
    return changed.rowcount == 1


def active_rounds(*, session: Session) -> int:
    """How many rounds are running now (their files must not be touched)."""
    return len(session.exec(select(TrainingRound.id).where(TrainingRound.status == RoundStatus.in_progress)).all())
