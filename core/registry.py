"""Model versions: numbering, production flag, promotion and rollback."""

import re
from pathlib import Path

import torch
from sqlmodel import Session, col, select

from core import gate
from core.access import Actor, Permission, require
from core.audit import record_audit
from core.config import get_settings
from core.errors import ConflictError, NotFoundError, UserError, bounded_text
from core.models import ModelVersion, PromotionEvent, utcnow

# ASCII digits only (str.isdigit() also takes '²' and '①', which int() refuses),
# and few enough that each part fits the database's integer column.
VERSION_PATTERN = re.compile(r"v?([0-9]{1,6})\.([0-9]{1,6})\.([0-9]{1,6})")


def parse_version(text: str) -> tuple[int, int, int]:
    """'1.2.3' -> (1, 2, 3); a clear error for anything else."""
    match = VERSION_PATTERN.fullmatch(text.strip())
    if match is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise UserError(f"'{shown}' is not a version: use MAJOR.MINOR.PATCH (each at most 6 digits), e.g. 1.0.0")
    major, minor, patch = (int(p) for p in match.groups())
    return major, minor, patch


def format_version(major: int, minor: int, patch: int) -> str:
    return f"{major}.{minor}.{patch}"


def list_versions(*, session: Session) -> list[ModelVersion]:
    """All versions, newest (highest) first."""
    order = (
        col(ModelVersion.major).desc(),
        col(ModelVersion.minor).desc(),
        col(ModelVersion.patch).desc(),
    )
    return list(session.exec(select(ModelVersion).order_by(*order)))


def latest_version(*, session: Session) -> ModelVersion | None:
    versions = list_versions(session=session)
    return versions[0] if versions else None


def get_version(version: str, *, session: Session) -> ModelVersion:
    major, minor, patch = parse_version(version)
    found = session.exec(
        select(ModelVersion).where(
            ModelVersion.major == major,
            ModelVersion.minor == minor,
            ModelVersion.patch == patch,
        )
    ).first()
    if found is None:
        known = ", ".join(v.version for v in list_versions(session=session)) or "none yet"
        raise NotFoundError(f"No model version {version}. Known versions: {known}")
    return found


def production_version(*, session: Session) -> ModelVersion | None:
    return session.exec(select(ModelVersion).where(ModelVersion.is_production)).first()


def next_version(classes: list[str], *, session: Session) -> str:
    """1.0.0 first; same class list as the latest: MINOR + 1; else MAJOR + 1."""
    latest = latest_version(session=session)
    if latest is None:
        return "1.0.0"
    if list(latest.classes) == list(classes):
        return format_version(latest.major, latest.minor + 1, 0)
    return format_version(latest.major + 1, 0, 0)


def _set_production(
    target: ModelVersion | None,
    *,
    session: Session,
    action: str,
    actor: Actor,
    reason: str | None = None,
    override: bool = False,
) -> PromotionEvent:
    current = production_version(session=session)
    if current is not None:
        current.is_production = False
        session.add(current)
        # The flag must be cleared before another row sets it.
        session.flush()
    if target is not None:
        target.is_production = True
        target.promoted_at = utcnow()
        session.add(target)
    event = PromotionEvent(
        from_version=current.version if current else None,
        to_version=target.version if target else None,
        action=action,
        by=actor.name,
        reason=reason,
        override=override,
    )
    session.add(event)
    record_audit(
        f"model.{action}",
        session=session,
        actor=actor,
        target=f"model:{event.to_version}",
        before={"production": event.from_version},
        after={"production": event.to_version, **({"reason": reason, "override": override} if reason else {})},
    )
    session.flush()
    return event


def held_back(version: ModelVersion) -> bool:
    """Whether the promotion gate kept `version` from production."""
    return bool(version.gate) and not version.gate.get("passed", True)


def reason_needed(target: ModelVersion, *, session: Session) -> str | None:
    """Why promoting `target` by hand needs a recorded reason, or None: the
    promotion gate held it back, or it scores much worse than production (by
    more than the gate's largest allowed drop of a category) on the test
    images both were scored on."""
    if held_back(target):
        return f"did not pass the promotion gate ({'; '.join(target.gate.get('reasons', []))})"
    current = production_version(session=session)
    if current is None or current.id == target.id:
        return None
    on_test = gate.compare_on_test(current, target, session=session)
    limit = gate.rules(session=session)["max_category_drop"]
    if on_test["images"] and on_test["a"] is not None and on_test["b"] is not None:
        drop = on_test["a"] - on_test["b"]
        if drop > limit:
            return (
                f"scores {drop:.1f} points below production {current.version} ({on_test['b']:.1f}% against "
                f"{on_test['a']:.1f}% on the {on_test['images']} test images both were scored on)"
            )
    return None


def promote(
    version: str, *, session: Session, actor: Actor, action: str = "promote", reason: str | None = None
) -> ModelVersion:
    """Make `version` the production model (the previous one stays, for rollback).

    A version that needs a reason (`reason_needed`) goes only with one,
    recorded with the promotion as an override."""
    require(actor, Permission.promote)
    target = get_version(version, session=session)
    if target.is_production:
        raise ConflictError(f"Model {version} is already in production")
    reason = bounded_text(reason, "A promotion reason", 500)
    why = reason_needed(target, session=session) if action == "promote" else None
    if why and reason is None:
        raise UserError(
            f"Model {version} {why}. Give a reason to promote it anyway; it is recorded with the promotion."
        )
    _set_production(target, session=session, action=action, actor=actor, reason=reason, override=why is not None)
    return target


def rollback_target(*, session: Session) -> tuple[ModelVersion, ModelVersion]:
    """(production now, the version a rollback puts back: the one in
    production before it); ConflictError when there is none."""
    current = production_version(session=session)
    if current is None:
        raise ConflictError("Nothing is in production, so there is nothing to roll back")
    events = session.exec(
        select(PromotionEvent)
        .where(PromotionEvent.to_version == current.version)
        .order_by(col(PromotionEvent.id).desc())
    ).first()
    previous = events.from_version if events else None
    if previous is None:
        raise ConflictError(
            f"Model {current.version} was the first in production; there is no earlier one to roll back to"
        )
    return current, get_version(previous, session=session)


def rollback(*, session: Session, actor: Actor) -> ModelVersion:
    """Put back the version that was in production before the current one."""
    require(actor, Permission.promote)
    _, target = rollback_target(session=session)
    _set_production(target, session=session, action="rollback", actor=actor)
    return target


def promotion_history(*, session: Session) -> list[PromotionEvent]:
    return list(session.exec(select(PromotionEvent).order_by(col(PromotionEvent.id).desc())))


def checkpoint_path(version: str) -> Path:
    return get_settings().checkpoints_dir / f"model_{version}.pt"


def load_checkpoint(version: ModelVersion) -> dict:
    """The weights and config a version was exported from."""
    return torch.load(
        get_settings().data_dir / version.checkpoint_path,
        map_location="cpu",
        weights_only=False,
    )


def cleanup_orphan_files(*, session: Session) -> list[Path]:
    """Delete model files that no committed version refers to (a crash between
    writing them and committing the version leaves such files)."""
    settings = get_settings()
    known = set()
    for version in list_versions(session=session):
        known.add((settings.data_dir / version.checkpoint_path).resolve())
        known.update((settings.data_dir / a["path"]).resolve() for a in version.artifacts)
    removed = []
    for folder in (settings.mobile_models_dir, settings.checkpoints_dir):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and path.name != ".gitkeep" and path.resolve() not in known:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def get_version_by_id(version_id: int, *, session: Session) -> ModelVersion:
    found = session.get(ModelVersion, version_id)
    if found is None:
        raise NotFoundError(f"No model version with id {version_id}")
    return found
