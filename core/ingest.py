"""Getting image files into the dataset: checked, content-addressed, deduplicated."""

import hashlib
import io
import os
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError
from sqlmodel import Session, func, select

from core.config import get_settings
from core.duplicates import image_hash
from core.errors import FileTooLargeError, InvalidImageError, UserError, bounded_text
from core.faults import crash_point
from core.models import Category, ImageSource, ImageStatus, TrainingImage
from core.splits import assign_splits
from core.storage import sync_files, write_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_FORMAT_SUFFIX = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "GIF": ".gif",
    "TIFF": ".tif",
}


@dataclass
class IngestResult:
    """What happened to one file: `stored`, `duplicate` or `refused`."""

    filename: str
    outcome: str
    image_id: int | None = None
    reason: str | None = None


@dataclass
class IngestReport:
    results: list[IngestResult] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def refused(self) -> list[IngestResult]:
        return [r for r in self.results if r.outcome == "refused"]

    def summary(self) -> str:
        return f"{self.count('stored')} stored, {self.count('duplicate')} duplicates, {self.count('refused')} refused"


@dataclass(frozen=True)
class CheckedImage:
    width: int
    height: int
    format: str
    # The near-duplicate hash (core/duplicates.py).
    phash: str


def safe_filename(name: str) -> str:
    """The last path component only, so `../../etc/passwd` becomes `passwd`."""
    base = PurePosixPath(name.replace("\\", "/")).name
    return base or "unnamed"


def check_size(size: int, filename: str = "file") -> None:
    """Raise FileTooLargeError when `size` bytes is over the upload limit."""
    limit = get_settings().max_upload_bytes
    if size > limit:
        raise FileTooLargeError(f"{filename}: the file is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB")


def check_image(data: bytes, filename: str = "file") -> CheckedImage:
    """Decode `data` fully; raise InvalidImageError saying why it is unusable."""
    settings = get_settings()
    if not data:
        raise InvalidImageError(f"{filename}: the file is empty (0 bytes)")
    check_size(len(data), filename)
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = im.width * im.height
            # Checked before decoding, so a bomb never gets to allocate memory.
            if pixels > settings.max_image_pixels:
                raise InvalidImageError(
                    f"{filename}: {im.width} x {im.height} pixels is over the limit of "
                    f"{settings.max_image_pixels:,} pixels (a possible decompression bomb); resize it first"
                )
            fmt = im.format or "unknown"
            im.load()
            oriented = ImageOps.exif_transpose(im)
            width, height = oriented.size
            phash = image_hash(oriented)
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError(f"{filename}: not an image (JPEG, PNG, WebP, BMP, GIF or TIFF expected)") from None
    except Image.DecompressionBombError:
        raise InvalidImageError(f"{filename}: too many pixels (a possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{filename}: the image is damaged or truncated ({exc})") from None
    if fmt not in _FORMAT_SUFFIX:
        raise InvalidImageError(f"{filename}: image format {fmt} is not supported")
    return CheckedImage(width=width, height=height, format=fmt, phash=phash)


def load_rgb(source: Path | BinaryIO) -> Image.Image:
    """Open an image (a file, or a stream of its bytes) upright (EXIF orientation applied) in RGB."""
    with Image.open(source) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def check_category_name(name: str) -> str:
    """`name` without surrounding spaces, or UserError saying what to change:
    names are printable text of at most 100 characters, without path
    separators or a leading dot (they become folder names in exports)."""
    clean = bounded_text(name, "A category name", 100)
    if not clean:
        raise UserError("A category name is required")
    if not clean.isprintable() or "/" in clean or "\\" in clean or clean.startswith("."):
        raise UserError(
            f"A category name must be printable text without / or \\ and must not start with a dot (got {clean!r})"
        )
    return clean


def find_category(name: str, *, session: Session) -> Category | None:
    """The category called `name`, compared case-insensitively ('Cat' is 'cat')."""
    return session.exec(select(Category).where(func.lower(Category.name) == name.strip().lower())).first()


def get_or_create_category(name: str, *, session: Session, create: bool = True) -> Category:
    """The category called `name` (in any case); created if missing and `create` is set.
    The naming rules apply to new names: a category made before them keeps working."""
    category = find_category(name, session=session)
    if category is None:
        clean = check_category_name(name)
        if not create:
            known = ", ".join(c.name for c in session.exec(select(Category).order_by(Category.name))) or "none yet"
            raise UserError(f"Unknown category '{clean}'. Known categories: {known}")
        category = Category(name=clean)
        session.add(category)
        session.flush()
    return category


def ingest_bytes(
    data: bytes,
    filename: str,
    *,
    session: Session,
    category: str | Category,
    status: ImageStatus = ImageStatus.pending,
    source: ImageSource = ImageSource.upload,
    device_id: str | None = None,
    uploaded_by: str | None = None,
    create_category: bool = True,
    assign_split: bool = True,
    written: list[Path] | None = None,
) -> IngestResult:
    """Check and store one file. Bad files are refused, not raised.

    Bulk imports pass `assign_split=False` and call `assign_splits` once at
    the end, a Category rather than its name (looked up once), and a list
    `written`: each new file is then written without its own fsync and added
    to it, for one `sync_files` before the commit."""
    name = safe_filename(filename)
    try:
        checked = check_image(data, name)
    except InvalidImageError as exc:
        return IngestResult(name, "refused", reason=str(exc))
    digest = hashlib.sha256(data).hexdigest()
    existing = session.exec(select(TrainingImage).where(TrainingImage.sha256 == digest)).first()
    if existing is not None:
        return IngestResult(name, "duplicate", image_id=existing.id)
    cat = (
        category
        if isinstance(category, Category)
        else get_or_create_category(category, session=session, create=create_category)
    )
    rel = Path("images") / digest[:2] / f"{digest}{_FORMAT_SUFFIX[checked.format]}"
    target = get_settings().data_dir / rel
    if target.exists():
        # A file without a row (yet) is swept once it is old: this one is in use again.
        os.utime(target)
    else:
        write_atomic(target, data, durable=written is None)
        if written is not None:
            written.append(target)
    crash_point("ingest.file_written")
    image = TrainingImage(
        sha256=digest,
        path=rel.as_posix(),
        original_filename=name,
        category_id=cat.id,
        status=status,
        source=source,
        device_id=device_id,
        width=checked.width,
        height=checked.height,
        size_bytes=len(data),
        uploaded_by=uploaded_by,
        phash=checked.phash,
    )
    session.add(image)
    session.flush()
    if assign_split:
        assign_splits(session=session)
    return IngestResult(name, "stored", image_id=image.id)


def import_folder(
    folder: Path,
    *,
    session: Session,
    status: ImageStatus = ImageStatus.pending,
    source: ImageSource = ImageSource.import_,
    uploaded_by: str | None = None,
) -> IngestReport:
    """Import `folder/<category>/<image>` (torchvision's ImageFolder layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(f"{folder} has no sub-folders: put each category's images in a sub-folder named after it")
    report = IngestReport()
    written: list[Path] = []
    for sub in subdirs:
        category = None
        for path in sorted(p for p in sub.rglob("*") if p.is_file() and not p.name.startswith(".")):
            result = ingest_bytes(
                path.read_bytes(),
                path.name,
                session=session,
                # The name until a picture is stored (which creates the category), then the row.
                category=category or sub.name,
                status=status,
                source=source,
                uploaded_by=uploaded_by,
                assign_split=False,
                written=written,
            )
            if category is None and result.outcome == "stored":
                category = get_or_create_category(sub.name, session=session)
            report.results.append(result)
    sync_files(written)
    assign_splits(session=session)
    return report


def _check_archive_size(entries: list[zipfile.ZipInfo]) -> None:
    """Refuse an archive by its directory alone, before decompressing anything.

    The sizes are the ones the archive declares; zipfile never returns more
    bytes than an entry declares (it reports a bad CRC instead), so a lying
    archive cannot get past this."""
    settings = get_settings()
    if len(entries) > settings.max_archive_entries:
        raise UserError(
            f"The archive holds {len(entries):,} entries; the limit is {settings.max_archive_entries:,} "
            "(MAX_ARCHIVE_ENTRIES): split it into smaller archives"
        )
    total = sum(info.file_size for info in entries)
    if total > settings.max_archive_bytes:
        raise UserError(
            f"The archive unpacks to {total / 2**20:,.0f} MB; the limit is "
            f"{settings.max_archive_bytes / 2**20:,.0f} MB (MAX_ARCHIVE_BYTES): split it into smaller archives"
        )


def import_zip(
    data: bytes,
    *,
    session: Session,
    status: ImageStatus = ImageStatus.pending,
    source: ImageSource = ImageSource.upload,
    uploaded_by: str | None = None,
    default_category: str | None = None,
) -> IngestReport:
    """Import a .zip of category folders; entries outside its root are refused."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UserError("The archive is not a valid .zip file") from None
    report = IngestReport()
    limit = get_settings().max_upload_bytes
    with archive:
        _check_archive_size(archive.infolist())
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                report.results.append(
                    IngestResult(
                        info.filename,
                        "refused",
                        reason=f"{info.filename}: path leaves the archive's root",
                    )
                )
                continue
            if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            category = parts[-2] if len(parts) >= 2 else default_category
            if category is None:
                report.results.append(
                    IngestResult(
                        info.filename,
                        "refused",
                        reason=f"{info.filename}: not inside a category folder",
                    )
                )
                continue
            if info.file_size > limit:
                reason = f"{info.filename}: {info.file_size / 2**20:.1f} MB is over the {limit / 2**20:.1f} MB limit"
                report.results.append(IngestResult(info.filename, "refused", reason=reason))
                continue
            try:
                content = archive.read(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
                # A damaged entry (bad CRC, truncated, unknown compression) is refused
                # like a bad image; the rest of the archive still goes in.
                reason = f"{info.filename}: damaged in the archive ({exc}); make the .zip again"
                report.results.append(IngestResult(info.filename, "refused", reason=reason))
                continue
            result = ingest_bytes(
                content,
                info.filename,
                session=session,
                category=category,
                status=status,
                source=source,
                uploaded_by=uploaded_by,
                assign_split=False,
            )
            report.results.append(result)
    assign_splits(session=session)
    return report


def remove_orphan_images(*, session: Session, grace: float | None = None) -> list[Path]:
    """Delete files under DATA_DIR/images that no image row refers to and that
    were not written or reused for `grace` seconds (ORPHAN_GRACE_SECONDS).

    An upload writes its files before its rows commit, so a server killed
    mid-upload (or an upload undone for any other reason) leaves files nobody
    knows about; the grace keeps the files of uploads still in progress."""
    settings = get_settings()
    grace = settings.orphan_grace_seconds if grace is None else grace
    known = set(session.exec(select(TrainingImage.path)).all())
    cutoff = time.time() - grace
    removed = []
    for path in sorted(settings.images_dir.rglob("*")) if settings.images_dir.is_dir() else []:
        orphan = path.is_file() and path.relative_to(settings.data_dir).as_posix() not in known
        if orphan and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def image_path(image: TrainingImage) -> Path:
    """Absolute path of a stored image."""
    return get_settings().data_dir / image.path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
