"""The audit trail: every consequential action, recorded by the core function
that performs it (so the dashboard, the API and the command line are all
covered), in the caller's transaction."""

from datetime import date, datetime, time, timedelta

from sqlmodel import Session, col, func, select

from core.access import SYSTEM_ACTOR, Actor
from core.models import UTC, AuditEvent

# The actions recorded, for the audit page's filter.
ACTIONS = (
    "image.validate",
    "image.reject",
    "image.relabel",
    "image.keep_label",
    "image.upload",
    "category.add",
    "category.rename",
    "category.delete",
    "category.merge",
    "training.start",
    "training.cancel",
    "training.stop",
    "federated.plan",
    "federated.update",
    "federated.aggregate",
    "automation.update",
    "model.promote",
    "model.rollback",
    "model.auto",
    "user.create",
    "user.role",
    "user.password",
    "user.deactivate",
    "user.activate",
    "token.create",
    "token.revoke",
)


def record_audit(
    action: str,
    *,
    session: Session,
    actor: Actor,
    target: str = "",
    before: dict | None = None,
    after: dict | None = None,
) -> AuditEvent:
    """Add one audit row; it commits (or rolls back) with the action itself."""
    # The system acts with an admin's permissions but is no admin: the trail says "system".
    role = "system" if actor == SYSTEM_ACTOR else str(actor.role)
    event = AuditEvent(actor=actor.name, actor_role=role, action=action, target=target, before=before, after=after)
    session.add(event)
    return event


def _filtered(
    query,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: date | None = None,
    until: date | None = None,
):
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action == action)
    if target:
        query = query.where(AuditEvent.target == target)
    if since:
        query = query.where(AuditEvent.at >= datetime.combine(since, time(), UTC))
    if until:
        query = query.where(AuditEvent.at < datetime.combine(until + timedelta(days=1), time(), UTC))
    return query


def find_events(
    *,
    session: Session,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: date | None = None,
    until: date | None = None,
    offset: int = 0,
    limit: int = 500,
) -> list[AuditEvent]:
    """Audit rows, newest first, filtered by who, what, on what and between two
    days (inclusive); `offset` and `limit` pick one page of them."""
    query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).offset(offset).limit(limit)
    return list(session.exec(_filtered(query, actor=actor, action=action, target=target, since=since, until=until)))


def count_events(
    *,
    session: Session,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: date | None = None,
    until: date | None = None,
) -> int:
    """How many rows `find_events` would give with these filters and no limit."""
    query = select(func.count(AuditEvent.id))
    return session.exec(_filtered(query, actor=actor, action=action, target=target, since=since, until=until)).one()


def actors(*, session: Session) -> list[str]:
    """Everyone who appears in the trail (for the audit page's filter)."""
    return list(session.exec(select(AuditEvent.actor).distinct().order_by(AuditEvent.actor)))


def image_history(image_id: int, *, session: Session) -> list[AuditEvent]:
    """What happened to one image, oldest first (its upload, reviews, relabels)."""
    return find_events(session=session, target=f"image:{image_id}")[::-1]


def _text(change: dict | None) -> str:
    return ", ".join(f"{key}: {value}" for key, value in (change or {}).items())


def as_rows(events: list[AuditEvent]) -> list[dict]:
    """Plain rows for a table: before/after as `key: value` text."""
    return [
        {
            "when": e.at,
            "who": e.actor,
            "role": e.actor_role,
            "action": e.action,
            "target": e.target,
            "before": _text(e.before),
            "after": _text(e.after),
        }
        for e in events
    ]
