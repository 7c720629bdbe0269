"""Read-only views of training rounds for the dashboard: the queue, the
running round, its phases, progress text and time left.

Every function only reads; the pages call them inside `core.db.read_session()`.
"""

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy.orm import defer
from sqlmodel import Session, col, func, select

from core.models import (
    FINISHED_STATUSES,
    PHASES,
    ModelVersion,
    RoundStatus,
    TrainingRound,
    as_utc,
    utcnow,
)
from core.quality_views import interval_text


def phase_seconds(round_: TrainingRound, now: datetime | None = None) -> dict[str, float]:
    """Seconds the round spent in each phase so far (the running one up to `now`)."""
    now = now or utcnow()
    spent: dict[str, float] = {}
    for phase in round_.phases:
        start = datetime.fromisoformat(phase["started_at"])
        end = datetime.fromisoformat(phase["ended_at"]) if phase["ended_at"] else now
        spent[phase["name"]] = spent.get(phase["name"], 0.0) + max(0.0, (as_utc(end) - as_utc(start)).total_seconds())
    return spent


def typical_phases(*, session: Session) -> dict[str, float]:
    """Seconds per phase of the last completed round that recorded its phases:
    how long exporting, checking and scoring will likely take this time."""
    rounds = session.exec(
        select(TrainingRound)
        .where(TrainingRound.status == RoundStatus.completed)
        .order_by(col(TrainingRound.id).desc())
        .limit(20)
    )
    for round_ in rounds:
        if round_.phases:
            return phase_seconds(round_)
    return {}


def round_phase(round_: TrainingRound) -> str | None:
    """The phase the round is in now (None when not running one)."""
    if round_.phases and round_.phases[-1]["ended_at"] is None:
        return round_.phases[-1]["name"]
    return None


def round_timing(
    round_: TrainingRound, now: datetime | None = None, typical: Mapping[str, float] | None = None
) -> tuple[float | None, float | None]:
    """Seconds since the round started and an estimate of the seconds left;
    None where not known yet. The estimate is the training left (from its
    progress so far) plus, from `typical` (see `typical_phases`), the phases
    still to come (exporting, checking the phone files, scoring, registering)."""
    elapsed = round_.elapsed_seconds(now)
    if elapsed is None:
        return None, None
    now = now or utcnow()
    if round_.status in FINISHED_STATUSES:
        return elapsed, 0.0
    typical = typical or {}
    current = round_phase(round_)
    if current is None or current not in PHASES:  # a round from before phases were recorded
        if round_.progress <= 0:
            return elapsed, None
        return elapsed, elapsed * (1 - round_.progress) / round_.progress
    spent = phase_seconds(round_, now)
    later = sum(typical.get(name, 0.0) for name in PHASES[PHASES.index(current) + 1 :])
    if current == "training":
        if round_.progress <= 0:
            return elapsed, None
        return elapsed, spent["training"] * (1 - round_.progress) / round_.progress + later
    if current == "preparing" and "training" not in typical:
        return elapsed, None
    return elapsed, max(0.0, typical.get(current, 0.0) - spent.get(current, 0.0)) + later


def phase_rows(round_: TrainingRound, typical: Mapping[str, float], now: datetime | None = None) -> list[dict]:
    """One row per phase: its state, seconds spent and its own progress (0-1;
    a phase other than training is measured against `typical`)."""
    spent = phase_seconds(round_, now)
    current = round_phase(round_)
    rows = []
    for name in PHASES:
        if name == current:
            state = "running"
            if name == "training":
                progress = round_.progress
            elif typical.get(name):
                progress = min(0.99, spent.get(name, 0.0) / typical[name])
            else:
                progress = None
        elif name in spent:
            state, progress = "done", 1.0
        else:
            state, progress = "to come", 0.0
        rows.append({"phase": name, "state": state, "progress": progress, "seconds": round(spent.get(name, 0.0), 1)})
    return rows


def progress_text(round_: TrainingRound) -> str:
    """What a running round is doing, in the same words everywhere (sidebar, Live metrics)."""
    phase = round_phase(round_)
    if phase not in (None, "training"):
        return phase
    epochs = round_.parameters.get("epochs", 0)
    return f"training: epoch {round_.current_epoch}/{epochs}, batch {round_.current_batch}/{round_.total_batches}"


def queue_overview(*, session: Session, recent: int = 10) -> list[dict]:
    """Running and queued rounds (with their place in the queue) and the
    `recent` last finished ones, newest first."""
    # Without their snapshots (every image of the round's dataset): megabytes each at 200,000 images.
    active = list(
        session.exec(
            select(TrainingRound)
            .options(defer(TrainingRound.snapshot, raiseload=True))
            .where(col(TrainingRound.status).in_([RoundStatus.queued, RoundStatus.in_progress]))
            .order_by(col(TrainingRound.id))
        )
    )
    finished = list(
        session.exec(
            select(TrainingRound)
            .options(defer(TrainingRound.snapshot, raiseload=True))
            .where(col(TrainingRound.status).in_(FINISHED_STATUSES))
            .order_by(col(TrainingRound.id).desc())
            .limit(recent)
        )
    )
    version_ids = [r.model_version_id for r in finished if r.model_version_id]
    versions = dict(
        session.exec(select(ModelVersion.id, ModelVersion.version).where(col(ModelVersion.id).in_(version_ids))).all()
    )
    queued = [r for r in active if r.status == RoundStatus.queued]
    position = {r.id: i for i, r in enumerate(queued, start=1)}
    rows = []
    for r in [*reversed(active), *finished]:
        elapsed, _ = round_timing(r)
        rows.append(
            {
                "round": r.id,
                "job_id": r.job_id,
                "status": r.status.value,
                "position": position.get(r.id),
                "progress": r.progress,
                "requested_by": r.requested_by,
                "created": as_utc(r.created_at),
                "duration_s": round(elapsed, 1) if elapsed is not None else None,
                "images": r.total_images,
                "device": r.device,
                "version": versions.get(r.model_version_id),
                "cancel_requested": r.cancel_requested,
            }
        )
    return rows


def current_round(*, session: Session) -> TrainingRound | None:
    """The running round, else the oldest queued one, else None."""
    for status in (RoundStatus.in_progress, RoundStatus.queued):
        found = session.exec(
            select(TrainingRound).where(TrainingRound.status == status).order_by(col(TrainingRound.id))
        ).first()
        if found is not None:
            return found
    return None


def queued_count(*, session: Session) -> int:
    return session.exec(select(func.count(TrainingRound.id)).where(TrainingRound.status == RoundStatus.queued)).one()


def trial_rows(round_: TrainingRound) -> list[dict]:
    """Auto mode's trials as the Live metrics page lists them: each validation
    accuracy with the images behind it and its 95 % interval, since trials
    a point or two apart on a small validation part are not told apart."""
    rows = []
    for row in round_.trials:
        images = row.get("val_images")
        rows.append({**row, "val_images": images, "val_interval": interval_text(row.get("val_accuracy"), images)})
    return rows
