"""A batch of uploaded files (images and `.zip` archives) into the dataset."""

from collections.abc import Iterable

from sqlmodel import Session

from core.errors import UserError
from core.ingest import IngestReport, IngestResult, import_zip, ingest_bytes
from core.models import ImageStatus


def ingest_uploads(
    files: Iterable[tuple[str, bytes]],
    *,
    session: Session,
    category: str | None,
    status: ImageStatus = ImageStatus.pending,
    uploaded_by: str | None = None,
) -> IngestReport:
    """Store `(filename, bytes)` pairs: images go to `category`, a `.zip` brings
    its category folders (loose files in it go to `category`). A bad file or
    archive is refused with its reason; the good ones still go in."""
    files = list(files)
    if not category and any(not name.lower().endswith(".zip") for name, _ in files):
        raise UserError("Choose a category for the images (only a .zip brings its own category folders)")
    report = IngestReport()
    for name, data in files:
        if not name.lower().endswith(".zip"):
            report.results.append(
                ingest_bytes(data, name, session=session, category=category, status=status, uploaded_by=uploaded_by)
            )
            continue
        try:
            archive = import_zip(
                data, session=session, status=status, uploaded_by=uploaded_by, default_category=category
            )
        except UserError as exc:
            report.results.append(IngestResult(name, "refused", reason=f"{name}: {exc}"))
        else:
            report.results.extend(archive.results)
    return report
