"""Curators' decisions on images: validate, reject, relabel."""

from collections.abc import Sequence

from sqlmodel import Session, func, select

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


def set_status(ids: Sequence[int], status: ImageStatus | str, *, session: Session, reviewer: str) -> int:
    """Give the images `status`, recording who and when. Returns how many changed."""
    try:
        status = ImageStatus(status)
    except ValueError:
        raise UserError(f"Unknown status '{status}': use pending, validated or rejected") from None
    images = _load(ids, session)
    now = utcnow()
    for image in images:
        image.status = status
        image.reviewed_by = reviewer
        image.reviewed_at = now
        session.add(image)
    session.flush()
    return len(images)


def validate_images(ids: Sequence[int], *, session: Session, reviewer: str) -> int:
    """Mark images fit for training."""
    return set_status(ids, ImageStatus.validated, session=session, reviewer=reviewer)


def reject_images(ids: Sequence[int], *, session: Session, reviewer: str) -> int:
    """Keep images out of training (they stay stored, for the record)."""
    return set_status(ids, ImageStatus.rejected, session=session, reviewer=reviewer)


def relabel_images(ids: Sequence[int], category: str, *, session: Session, reviewer: str) -> int:
    """Move images to another (existing) category."""
    target = get_or_create_category(category, session=session, create=False)
    images = _load(ids, session)
    now = utcnow()
    for image in images:
        image.category_id = target.id
        image.reviewed_by = reviewer
        image.reviewed_at = now
        session.add(image)
    session.flush()
    return len(images)


def add_category(name: str, *, session: Session) -> Category:
    """Create a category; refuses a name that exists."""
    clean = name.strip()
    if session.exec(select(Category).where(Category.name == clean)).first():
        raise UserError(f"Category '{clean}' already exists")
    return get_or_create_category(clean, session=session)


def rename_category(old: str, new: str, *, session: Session) -> Category:
    """Rename a category; its images follow (they refer to it by id)."""
    category = get_or_create_category(old, session=session, create=False)
    clean = new.strip()
    if not clean:
        raise UserError("A category name is required")
    if clean != category.name and session.exec(select(Category).where(Category.name == clean)).first():
        raise UserError(f"Category '{clean}' already exists")
    category.name = clean
    session.add(category)
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
