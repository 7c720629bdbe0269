"""Read-only views of the images for the dashboard: filtered image lists,
search by id or file name, the filter choices, category warnings and the
dataset's growth per day.

Every function only reads; the pages call them inside `core.db.read_session()`.
"""

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlmodel import Session, col, func, select

from core.models import (
    Category,
    ImageSource,
    ImageStatus,
    TrainingImage,
)


@dataclass
class ImagePage:
    """One page of a filtered image list and how many match in all."""

    rows: list[tuple[TrainingImage, str]]
    total: int


def find_images(
    *,
    session: Session,
    status: str | None = None,
    category: str | None = None,
    source: str | None = None,
    device: str | None = None,
    uploaded_from: date | None = None,
    uploaded_to: date | None = None,
    offset: int = 0,
    limit: int = 24,
) -> ImagePage:
    """Images with their category name, newest first; `None` filters match all.
    `uploaded_to` is inclusive (the whole day)."""
    conditions = []
    if status:
        conditions.append(TrainingImage.status == ImageStatus(status))
    if category:
        conditions.append(Category.name == category)
    if source:
        conditions.append(TrainingImage.source == ImageSource(source))
    if device:
        conditions.append(TrainingImage.device_id == device)
    if uploaded_from:
        conditions.append(TrainingImage.uploaded_at >= datetime.combine(uploaded_from, time.min, UTC))
    if uploaded_to:
        conditions.append(TrainingImage.uploaded_at < datetime.combine(uploaded_to + timedelta(days=1), time.min, UTC))
    base = select(TrainingImage, Category.name).join(Category, Category.id == TrainingImage.category_id)
    total = session.exec(
        select(func.count(TrainingImage.id)).join(Category, Category.id == TrainingImage.category_id).where(*conditions)
    ).one()
    rows = session.exec(
        base.where(*conditions).order_by(col(TrainingImage.id).desc()).offset(offset).limit(limit)
    ).all()
    return ImagePage(rows=list(rows), total=total)


def filter_options(*, session: Session) -> dict[str, list[str]]:
    """The values the image filters can take: categories, sources and device ids in use."""
    categories = session.exec(select(Category.name).order_by(Category.name)).all()
    sources = session.exec(select(TrainingImage.source).distinct()).all()
    devices = session.exec(
        select(TrainingImage.device_id).where(col(TrainingImage.device_id).is_not(None)).distinct()
    ).all()
    return {
        "categories": list(categories),
        "sources": sorted(ImageSource(s).value for s in sources),
        "devices": sorted(devices),
    }


def images_by_id(ids: list[int], *, session: Session) -> dict[int, TrainingImage]:
    """The images with these ids (missing ones are left out)."""
    if not ids:
        return {}
    return {img.id: img for img in session.exec(select(TrainingImage).where(col(TrainingImage.id).in_(ids)))}


def search_images(text: str, *, session: Session, limit: int = 20) -> list[TrainingImage]:
    """Images whose id is `text` ("12" or "#12") or whose original file name
    contains it (ignoring case), newest first."""
    text = text.strip().removeprefix("#")
    if not text:
        return []
    match = func.lower(TrainingImage.original_filename).contains(text.lower(), autoescape=True)
    if text.isdigit():
        match = match | (TrainingImage.id == int(text))
    query = select(TrainingImage).where(match).order_by(col(TrainingImage.id).desc()).limit(limit)
    return list(session.exec(query))


def category_warnings(counts: Mapping[str, int], *, minimum: int, far_below: float = 0.25) -> list[str]:
    """Why the validated images per category may train a poor model: a category
    under `minimum`, or under `far_below` times the median of the others."""
    warnings = []
    for name, n in counts.items():
        others = [v for k, v in counts.items() if k != name]
        median = statistics.median(others) if others else 0
        if n < minimum:
            warnings.append(f"'{name}' has {n} validated images; training needs at least {minimum} per category.")
        elif median and n < far_below * median:
            warnings.append(
                f"'{name}' has {n} validated images, far below the others (median {median:g}): "
                "the model will rarely predict it. Add or validate more."
            )
    return warnings


def dataset_over_time(*, session: Session) -> list[dict]:
    """Images in the dataset (rejected ones left out) per category at the end of
    each upload day: [{"day", "category", "images"}, ...], cumulative."""
    day = func.date(TrainingImage.uploaded_at)
    rows = session.exec(
        select(day, Category.name, func.count(TrainingImage.id))
        .join(Category, Category.id == TrainingImage.category_id)
        .where(TrainingImage.status != ImageStatus.rejected)
        .group_by(day, Category.name)
        .order_by(day)
    ).all()
    days = sorted({d for d, _, _ in rows})
    categories = sorted({c for _, c, _ in rows})
    added = {(d, c): n for d, c, n in rows}
    out, running = [], dict.fromkeys(categories, 0)
    for d in days:
        for c in categories:
            running[c] += added.get((d, c), 0)
            out.append({"day": date.fromisoformat(str(d)), "category": c, "images": running[c]})
    return out
