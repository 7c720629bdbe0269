"""Automatic retraining triggers and the promotion gate's settings (one row).

Operators set two triggers on the Train page (or `python -m cli automation`):
retrain when enough new validated images arrived since the last round, and/or
every so many hours. The queue runs `check_triggers` every minute (a Huey
periodic task in `jobs/queue.py`); when a trigger fires, the caller creates
the round in the same transaction, so at most one automatic job is ever queued
or running, however many consumers check at once.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.access import Actor, Permission, require
from core.audit import record_audit
from core.automation_settings import AUTOMATION_ID, get_automation
from core.errors import UserError, check_number
from core.models import Automation, ImageStatus, RoundStatus, TrainingImage, TrainingRound, as_utc, utcnow
from core.training.config import TrainingConfig
from core.training.preflight import preflight

NEW_IMAGES = "new_images"
SCHEDULE = "schedule"
TRIGGERS = (NEW_IMAGES, SCHEDULE)
# The queue's periodic task runs at every whole minute (jobs/queue.py).
CHECK_INTERVAL = timedelta(minutes=1)
# A check older than this while a trigger is on means no consumer runs the checks.
STALE_CHECK = timedelta(minutes=3)

# name -> (type, minimum, maximum) of the numeric settings.
SETTING_RANGES: dict[str, tuple[type, float, float]] = {
    "new_images_threshold": (int, 1, 1_000_000),
    "schedule_hours": (float, 0.25, 24 * 30.0),
    "gate_min_improvement": (float, 0.0, 100.0),
    "gate_max_category_drop": (float, 0.0, 100.0),
    "gate_min_test_images": (int, 1, 1_000_000),
}
SWITCHES = ("new_images_enabled", "schedule_enabled")
SETTINGS = (*SWITCHES, *SETTING_RANGES, "parameters")


def _locked_automation(*, session: Session) -> Automation:
    """The settings row, created if missing, locked for this transaction.

    PostgreSQL takes a row lock (FOR UPDATE); SQLite ignores the clause, but
    this project's writing sessions start with BEGIN IMMEDIATE, which already
    holds the database's single write lock until the transaction ends."""
    query = select(Automation).where(Automation.id == AUTOMATION_ID).with_for_update()
    row = session.exec(query).first()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            session.add(Automation(id=AUTOMATION_ID))
    except IntegrityError:  # another process created it first; wait for its lock
        pass
    return session.exec(query.execution_options(populate_existing=True)).one()


def _check_setting(name: str, value):
    if name in SWITCHES:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false (got {value!r})")
        return value
    if name == "parameters":
        if not isinstance(value, Mapping):
            raise UserError(f"parameters must be a mapping of training parameters (got {value!r})")
        # Only what was given is kept; the rest stays at today's defaults.
        config = TrainingConfig.from_params(value).to_dict()
        return {key: config[key] for key, given in value.items() if given is not None}
    kind, low, high = SETTING_RANGES[name]
    return check_number(name, value, kind, low, high)


def update_automation(changes: Mapping, *, session: Session, actor: Actor) -> Automation:
    """Change the triggers, the gate settings or the automatic jobs' parameters.

    Every value is checked before anything changes; an unknown field or a value
    out of range raises UserError naming the field and its range. Audited as
    `automation.update` with the changed fields before and after."""
    require(actor, Permission.train)
    unknown = sorted(set(changes) - set(SETTINGS))
    if unknown:
        raise UserError(f"Unknown automation setting(s) {', '.join(unknown)}; allowed: {', '.join(SETTINGS)}")
    values = {name: _check_setting(name, value) for name, value in changes.items()}
    row = _locked_automation(session=session)
    before = {name: getattr(row, name) for name in values}
    for name, value in values.items():
        setattr(row, name, value)
    row.updated_by = actor.name
    row.updated_at = utcnow()
    session.add(row)
    record_audit("automation.update", session=session, actor=actor, target="automation", before=before, after=values)
    session.flush()
    return row


def _newest_round(*, session: Session) -> TrainingRound | None:
    return session.exec(select(TrainingRound).order_by(col(TrainingRound.id).desc()).limit(1)).first()


def new_images_since_last_round(*, session: Session) -> int:
    """Validated images that are not in the newest round's snapshot (all of
    them when there is no round yet).

    The newest round of any status counts, finished or not: an automatic round
    that failed or was cancelled has used up the images it snapshotted, so the
    trigger waits for N more instead of firing again at the next check, every
    minute, on the same data."""
    newest = _newest_round(session=session)
    seen = {entry["id"] for entry in newest.snapshot} if newest else set()
    validated = session.exec(select(TrainingImage.id).where(TrainingImage.status == ImageStatus.validated)).all()
    return sum(1 for image_id in validated if image_id not in seen)


def active_automatic_round(*, session: Session) -> TrainingRound | None:
    """The queued or running round a trigger started, if any."""
    query = select(TrainingRound).where(
        col(TrainingRound.trigger).is_not(None),
        col(TrainingRound.status).in_([RoundStatus.queued, RoundStatus.in_progress]),
    )
    return session.exec(query.order_by(TrainingRound.id).limit(1)).first()


def next_scheduled_at(settings: Automation) -> datetime | None:
    """When the schedule is due next (None: the schedule is off); a past time: due now."""
    if not settings.schedule_enabled:
        return None
    last = as_utc(settings.last_scheduled_at)
    return None if last is None else last + timedelta(hours=settings.schedule_hours)


def next_check_at(now: datetime | None = None, last_check_at: datetime | None = None) -> datetime:
    """When the queue's periodic check runs next (at the latest).

    A consumer enqueues the check every minute counted from its own start (not
    at whole minutes), so the next one is a whole number of minutes after the
    last; with no recent check, within a minute from now."""
    now = as_utc(now) or utcnow()
    last = as_utc(last_check_at)
    if last is None or now - last > STALE_CHECK:
        return now + CHECK_INTERVAL
    return last + CHECK_INTERVAL * (math.floor((now - last) / CHECK_INTERVAL) + 1)


def parameters_text(settings: Automation) -> str:
    """The automatic jobs' training parameters, for people."""
    return ", ".join(f"{name} {value}" for name, value in settings.parameters.items()) or "the defaults"


@dataclass(frozen=True)
class TriggerDecision:
    """What a check decided: the trigger that fires (None: nothing), and why."""

    trigger: str | None
    reason: str


def _decide(settings: Automation, now: datetime, *, session: Session) -> TriggerDecision:
    active = active_automatic_round(session=session)
    if active is not None:
        state = "running" if active.status == RoundStatus.in_progress else "queued"
        return TriggerDecision(None, f"an automatic job is already {state} (job {active.job_id}, {active.trigger})")
    if not (settings.new_images_enabled or settings.schedule_enabled):
        return TriggerDecision(None, "no trigger is on")
    reasons = []
    new = new_images_since_last_round(session=session)
    if settings.new_images_enabled and new >= settings.new_images_threshold:
        reasons.append((NEW_IMAGES, f"{new} new validated images (threshold {settings.new_images_threshold})"))
    due = next_scheduled_at(settings)
    if settings.schedule_enabled and (due is None or now >= due):
        # First when both are due: its round snapshots the new images too, so
        # the new-images trigger does not fire again right after it.
        when = "never ran" if due is None else f"due since {due:%Y-%m-%d %H:%M} UTC"
        reasons.insert(0, (SCHEDULE, f"the schedule every {settings.schedule_hours:g} h ({when})"))
    if not reasons:
        waiting = []
        if settings.new_images_enabled:
            waiting.append(f"{new} of {settings.new_images_threshold} new validated images")
        if settings.schedule_enabled:
            waiting.append(f"next scheduled run at {due:%Y-%m-%d %H:%M} UTC")
        return TriggerDecision(None, "waiting: " + "; ".join(waiting))
    text = " and ".join(reason for _, reason in reasons)
    try:
        config = TrainingConfig.from_params(settings.parameters)
    except UserError as exc:  # saved under older rules; say so at every check instead of failing
        return TriggerDecision(None, f"{text}, but the automatic jobs' parameters are invalid: {exc}")
    check = preflight(config, session=session)
    if not check.ok:
        return TriggerDecision(None, f"{text}, but training cannot start: {' '.join(check.problems)}")
    return TriggerDecision(reasons[0][0], f"started by {text}")


def check_triggers(*, session: Session, now: datetime | None = None) -> TriggerDecision:
    """Decide whether an automatic round should start now, and record the check.

    Nothing fires while an automatic round is queued or running, nor when the
    dataset fails the training rules. The settings row is locked until the
    caller's transaction ends: the caller creates the round in that same
    transaction, so two consumers checking at once never queue two jobs.
    Writes `last_check_at`, `last_check_result` and, when the schedule fires,
    `last_scheduled_at`."""
    now = as_utc(now) or utcnow()
    settings = _locked_automation(session=session)
    decision = _decide(settings, now, session=session)
    settings.last_check_at = now
    settings.last_check_result = decision.reason
    if decision.trigger == SCHEDULE:
        settings.last_scheduled_at = now
    session.add(settings)
    session.flush()
    return decision


@dataclass(frozen=True)
class AutomationState:
    """What the Train page and `python -m cli automation` show."""

    settings: Automation
    new_images: int
    new_images_text: str
    schedule_text: str
    last_check_text: str
    next_check_at: datetime
    # Set when a trigger is on but no check ran lately (no consumer running).
    warning: str | None

    def lines(self) -> list[str]:
        lines = [
            f"New images: {self.new_images_text}",
            f"Schedule: {self.schedule_text}",
            f"Last check: {self.last_check_text}",
            f"Next check: by {self.next_check_at:%Y-%m-%d %H:%M:%S} UTC",
            f"Automatic jobs train with: {parameters_text(self.settings)}",
        ]
        return [*lines, f"Warning: {self.warning}"] if self.warning else lines


def state(*, session: Session, now: datetime | None = None) -> AutomationState:
    """Each trigger's state, the last check and its result, the next check (read only)."""
    now = as_utc(now) or utcnow()
    settings = get_automation(session=session)
    new = new_images_since_last_round(session=session)
    counted = f"{new} of {settings.new_images_threshold} new validated images"
    new_text = f"on: {counted}" if settings.new_images_enabled else f"off ({counted})"
    due = next_scheduled_at(settings)
    if not settings.schedule_enabled:
        schedule_text = f"off (every {settings.schedule_hours:g} h when on)"
    elif due is None or due <= now:
        schedule_text = f"on, every {settings.schedule_hours:g} h: due now (at the next check)"
    else:
        schedule_text = f"on, every {settings.schedule_hours:g} h: next scheduled run at {due:%Y-%m-%d %H:%M} UTC"
    last = as_utc(settings.last_check_at)
    last_text = "never" if last is None else f"{last:%Y-%m-%d %H:%M:%S} UTC: {settings.last_check_result}"
    warning = None
    # Since the last check, or since the settings changed when none ran yet.
    quiet_since = last or as_utc(settings.updated_at) or now
    if (settings.new_images_enabled or settings.schedule_enabled) and now - quiet_since > STALE_CHECK:
        warning = (
            "no check ran in the last few minutes: checks wait while the worker trains, "
            "and need a running worker (`python -m cli worker`)"
        )
    next_check = next_check_at(now, last)
    return AutomationState(settings, new, new_text, schedule_text, last_text, next_check, warning)
