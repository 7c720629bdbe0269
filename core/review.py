"""Curators' decisions on images: validate, reject, relabel."""

from collections.abc import Sequence

from sqlmodel import Session, func, select

from core.access import Actor, Permission, require
from core.audit import record_audit
from core.errors import NotFoundError, UserError
from core.ingest import get_or_create_category
from core.models import Category, ImageStatus, TrainingImage, utcnow


def _load(ids: Sequence[int], session: Session) -> list[TrainingImage]:
    unique = list(dict.fromkeys(int(i) for i in ids))
    if not unique:
        raise UserError("Select at least one image")
    images = list(session.exec(select(TrainingImage).where(TrainingImage.id.in_(unique))))
    missing = sorted(set(unique) - {img.id for img in images})
    if missing:
        raise NotFoundError(f"No image with id {', '.join(map(str, missing))}")
    return images


# Acting on more images than this at once asks for a confirmation stating the count.
HANDFUL = 5


def confirmation(action: str, count: int) -> str | None:
    """The question to ask before `action` ("validate", "reject") on `count`
    images, or None for a handful or fewer."""
    if count <= HANDFUL:
        return None
    return f"{action.capitalize()} all {count} images? This cannot be undone in one step."


def set_status(ids: Sequence[int], status: ImageStatus | str, *, session: Session, actor: Actor) -> int:
    """Give the images `status`, recording who and when. Returns how many changed."""
    require(actor, Permission.review_images)
    try:
        status = ImageStatus(status)
    except ValueError:
        raise UserError(f"Unknown status '{status}': use pending, validated or rejected") from None
    images = _load(ids, session)
    now = utcnow()
    action = {ImageStatus.validated: "image.validate", ImageStatus.rejected: "image.reject"}.get(status, "image.status")
    for image in images:
        before = image.status.value
        image.status = status
        image.reviewed_by = actor.name
        image.reviewed_at = now
        session.add(image)
        record_audit(
            action,
            session=session,
            actor=actor,
            target=f"image:{image.id}",
            before={"status": before},
            after={"status": status.value},
        )
    session.flush()
    return len(images)


def validate_images(ids: Sequence[int], *, session: Session, actor: Actor) -> int:
    """Mark images fit for training."""
    return set_status(ids, ImageStatus.validated, session=session, actor=actor)


def reject_images(ids: Sequence[int], *, session: Session, actor: Actor) -> int:
    """Keep images out of training (they stay stored, for the record)."""
    return set_status(ids, ImageStatus.rejected, session=session, actor=actor)


def relabel_images(ids: Sequence[int], category: str, *, session: Session, actor: Actor) -> int:
    """Move images to another (existing) category."""
    require(actor, Permission.review_images)
    target = get_or_create_category(category, session=session, create=False)
    images = _load(ids, session)
    names = dict(session.exec(select(Category.id, Category.name)).all())
    now = utcnow()
    for image in images:
        before = names.get(image.category_id)
        image.category_id = target.id
        image.reviewed_by = actor.name
        image.reviewed_at = now
        session.add(image)
        record_audit(
            "image.relabel",
            session=session,
            actor=actor,
            target=f"image:{image.id}",
            before={"category": before},
            after={"category": target.name},
        )
    session.flush()
    return len(images)


def add_category(name: str, *, session: Session, actor: Actor) -> Category:
    """Create a category; refuses a name that exists."""
    require(actor, Permission.manage_categories)
    clean = name.strip()
    if session.exec(select(Category).where(Category.name == clean)).first():
        raise UserError(f"Category '{clean}' already exists")
    category = get_or_create_category(clean, session=session)
    record_audit("category.add", session=session, actor=actor, target=f"category:{category.name}")
    return category


def rename_category(old: str, new: str, *, session: Session, actor: Actor) -> Category:
    """Rename a category; its images follow (they refer to it by id)."""
    require(actor, Permission.manage_categories)
    category = get_or_create_category(old, session=session, create=False)
    clean = new.strip()
    if not clean:
        raise UserError("A category name is required")
    if clean != category.name and session.exec(select(Category).where(Category.name == clean)).first():
        raise UserError(f"Category '{clean}' already exists")
    before = category.name
    category.name = clean
    session.add(category)
    record_audit(
        "category.rename",
        session=session,
        actor=actor,
        target=f"category:{category.id}",
        before={"name": before},
        after={"name": clean},
    )
    session.flush()
    return category


def status_counts(*, session: Session) -> dict[str, int]:
    """Number of images per review status (every status present, maybe 0)."""
    rows = session.exec(select(TrainingImage.status, func.count()).group_by(TrainingImage.status)).all()
    counts = {s.value: 0 for s in ImageStatus}
    counts.update({ImageStatus(s).value: n for s, n in rows})
    return counts


def validated_counts(*, session: Session) -> dict[str, int]:
    """Validated images per category name (categories with none included)."""
    rows = session.exec(
        select(Category.name, func.count(TrainingImage.id))
        .join(
            TrainingImage,
            (TrainingImage.category_id == Category.id) & (TrainingImage.status == ImageStatus.validated),
            isouter=True,
        )
        .group_by(Category.name)
        .order_by(Category.name)
    ).all()
    return dict(rows)
