"""Images into the dataset on someone's behalf: uploaded files and `.zip`
archives, a folder on the server, the demo dataset. Each checks the actor's
role and records every stored image in the audit trail."""

from collections.abc import Iterable, Iterator
from pathlib import Path

from sqlmodel import Session, col, select

from core.access import Actor, Permission, require
from core.audit import record_audit
from core.demo import load_demo_dataset
from core.errors import UserError, bounded_text
from core.ingest import IngestReport, IngestResult, NewFile, import_folder, ingest_files, zip_files
from core.models import Category, ImageSource, ImageStatus, TrainingImage


def _require(actor: Actor, status: ImageStatus) -> None:
    require(actor, Permission.upload_images)
    if status != ImageStatus.pending:
        # Storing images as already reviewed is a review decision.
        require(actor, Permission.review_images)


def _audit(report: IngestReport, *, session: Session, actor: Actor) -> IngestReport:
    stored = {r.image_id: r.filename for r in report.results if r.outcome == "stored"}
    rows = session.exec(
        select(TrainingImage, Category.name).join(Category).where(col(TrainingImage.id).in_(list(stored)))
    ).all()
    for image, category in rows:
        record_audit(
            "image.upload",
            session=session,
            actor=actor,
            target=f"image:{image.id}",
            after={
                "file": stored[image.id],
                "category": category,
                "status": image.status.value,
                "source": image.source.value,
            },
        )
    return report


# Phones send a model name or an install id; anything longer is not an id.
MAX_DEVICE_ID = 100


def ingest_uploads(
    files: Iterable[tuple[str, bytes]],
    *,
    session: Session,
    actor: Actor,
    category: str | None,
    status: ImageStatus = ImageStatus.pending,
    source: ImageSource = ImageSource.upload,
    device_id: str | None = None,
    archives: bool = True,
) -> IngestReport:
    """Store `(filename, bytes)` pairs: images go to `category`, a `.zip` (when
    `archives`) brings its category folders (loose files in it go to
    `category`). A bad file or archive is refused with its reason; the good
    ones still go in. Without `archives` the category must exist."""
    _require(actor, status)
    device_id = bounded_text(device_id, "device_id", MAX_DEVICE_ID)
    files = list(files)
    is_zip = [archives and name.lower().endswith(".zip") for name, _ in files]
    if not category and not all(is_zip):
        raise UserError("Choose a category for the images (only a .zip brings its own category folders)")
    files = (
        _unpacked(name, data, category) if archive else [NewFile(data, name, category)]
        for (name, data), archive in zip(files, is_zip, strict=True)
    )
    report = ingest_files(
        (file for group in files for file in group),
        session=session,
        status=status,
        source=source,
        device_id=device_id,
        uploaded_by=actor.name,
        create_category=archives,
    )
    return _audit(report, session=session, actor=actor)


def _unpacked(name: str, data: bytes, category: str | None) -> Iterator[NewFile | IngestResult]:
    """The files of the archive `name`, or the archive refused with its reason."""
    try:
        yield from zip_files(data, default_category=category)
    except UserError as exc:
        yield IngestResult(name, "refused", reason=f"{name}: {exc}")


def import_directory(
    folder: Path,
    *,
    session: Session,
    actor: Actor,
    status: ImageStatus = ImageStatus.pending,
    parallel: bool = False,
) -> IngestReport:
    """Import `folder/<category>/<image>` from the server's disk (`parallel`: see `ingest_files`)."""
    _require(actor, status)
    report = import_folder(folder, session=session, status=status, uploaded_by=actor.name, parallel=parallel)
    return _audit(report, session=session, actor=actor)


def load_demo(
    *, session: Session, actor: Actor, status: ImageStatus = ImageStatus.validated, **options
) -> IngestReport:
    """The demo dataset (core.demo), loaded on `actor`'s behalf."""
    _require(actor, status)
    report = load_demo_dataset(session=session, status=status, uploaded_by=actor.name, **options)
    return _audit(report, session=session, actor=actor)
