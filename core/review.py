"""Curators' decisions on images: validate, reject, relabel."""

from collections.abc import Callable, Sequence

from sqlmodel import Session, func, select, update

from core.access import Actor, Permission, require
from core.audit import record_audit
from core.errors import NotFoundError, UserError
from core.ingest import check_category_name, find_category, get_or_create_category
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
    action = {ImageStatus.validated: "image.validate", ImageStatus.rejected: "image.reject"}.get(status, "image.status")

    def change(image: TrainingImage) -> tuple[dict, dict]:
        before = image.status.value
        image.status = status
        return {"status": before}, {"status": status.value}

    return _review(_load(ids, session), action, change, session=session, actor=actor)


def reject_images(ids: Sequence[int], *, session: Session, actor: Actor) -> int:
    """Keep images out of training (they stay stored, for the record)."""
    return set_status(ids, ImageStatus.rejected, session=session, actor=actor)


def relabel_images(ids: Sequence[int], category: str, *, session: Session, actor: Actor) -> int:
    """Move images to another (existing) category."""
    require(actor, Permission.review_images)
    target = get_or_create_category(category, session=session, create=False)
    names = dict(session.exec(select(Category.id, Category.name)).all())

    def change(image: TrainingImage) -> tuple[dict, dict]:
        before = names.get(image.category_id)
        image.category_id = target.id
        return {"category": before}, {"category": target.name}

    return _review(_load(ids, session), "image.relabel", change, session=session, actor=actor)


def _review(
    images: list[TrainingImage],
    action: str,
    change: Callable[[TrainingImage], tuple[dict, dict]],
    *,
    session: Session,
    actor: Actor,
) -> int:
    """Apply `change` to each image (it returns what the audit records as before
    and after), mark the image reviewed by `actor` now, and audit it as `action`."""
    now = utcnow()
    for image in images:
        before, after = change(image)
        image.reviewed_by = actor.name
        image.reviewed_at = now
        session.add(image)
        record_audit(action, session=session, actor=actor, target=f"image:{image.id}", before=before, after=after)
    session.flush()
    return len(images)


def add_category(name: str, *, session: Session, actor: Actor) -> Category:
    """Create a category; refuses a name that exists in any case ('Cat' beside 'cat')."""
    require(actor, Permission.manage_categories)
    clean = check_category_name(name)
    if existing := find_category(clean, session=session):
        raise UserError(f"Category '{existing.name}' already exists")
    category = get_or_create_category(clean, session=session)
    record_audit("category.add", session=session, actor=actor, target=f"category:{category.name}")
    return category


def rename_category(old: str, new: str, *, session: Session, actor: Actor) -> Category:
    """Rename a category; its images follow (they refer to it by id). A change
    of case only ('cat' to 'Cat') is a rename too."""
    require(actor, Permission.manage_categories)
    category = get_or_create_category(old, session=session, create=False)
    clean = check_category_name(new)
    existing = find_category(clean, session=session)
    if existing is not None and existing.id != category.id:
        raise UserError(f"Category '{existing.name}' already exists: merge '{category.name}' into it instead")
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


def _image_ids(category: Category, *, session: Session) -> list[int]:
    query = select(TrainingImage.id).where(TrainingImage.category_id == category.id).order_by(TrainingImage.id)
    return list(session.exec(query))


def delete_category(name: str, *, session: Session, actor: Actor) -> None:
    """Delete a category that has no images (of any status); one with images
    is merged into another instead (`merge_category`)."""
    require(actor, Permission.manage_categories)
    category = get_or_create_category(name, session=session, create=False)
    if count := len(_image_ids(category, session=session)):
        raise UserError(
            f"Category '{category.name}' has {count} image(s), so it cannot be deleted: "
            "merge it into another category instead"
        )
    session.delete(category)
    record_audit("category.delete", session=session, actor=actor, target=f"category:{category.name}")
    session.flush()


def merge_category(source: str, target: str, *, session: Session, actor: Actor) -> int:
    """Move every image of `source` (any status) into `target`, then delete
    `source`. Returns how many images moved; the audit trail lists them."""
    require(actor, Permission.manage_categories)
    from_ = get_or_create_category(source, session=session, create=False)
    into = get_or_create_category(target, session=session, create=False)
    if from_.id == into.id:
        raise UserError(f"Choose two different categories to merge (got '{from_.name}' twice)")
    moved = _image_ids(from_, session=session)
    if moved:
        session.exec(update(TrainingImage).where(TrainingImage.category_id == from_.id).values(category_id=into.id))
    session.delete(from_)
    record_audit(
        "category.merge",
        session=session,
        actor=actor,
        target=f"category:{from_.name}",
        before={"name": from_.name, "images": moved},
        after={"merged_into": into.name},
    )
    session.flush()
    return len(moved)


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
