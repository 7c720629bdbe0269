"""Getting image files into the dataset: checked, content-addressed, deduplicated."""

import hashlib
import io
import os
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps, UnidentifiedImageError
from sqlmodel import Session, func, select

from core.config import get_settings
from core.duplicates import image_hash, image_thumb
from core.errors import FileTooLargeError, InvalidImageError, UserError, bounded_text
from core.faults import crash_point
from core.models import Category, ImageSource, ImageStatus, LookAlikeThumb, TrainingImage
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
    # The look-alike hash and thumbnail (core/duplicates.py).
    phash: str
    thumb: bytes


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
            thumb = image_thumb(oriented)
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
    return CheckedImage(width=width, height=height, format=fmt, phash=phash, thumb=thumb)


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


@dataclass(frozen=True)
class NewFile:
    """One file for `ingest_files`: its bytes, its name and the category it goes to."""

    data: bytes
    filename: str
    category: str


def ingest_files(
    files: Iterable[NewFile | IngestResult],
    *,
    session: Session,
    status: ImageStatus = ImageStatus.pending,
    source: ImageSource = ImageSource.upload,
    device_id: str | None = None,
    uploaded_by: str | None = None,
    create_category: bool = True,
) -> IngestReport:
    """Check and store each file (bad ones are refused, not raised), then give
    the new images their splits, once for the batch (`assign_splits`). A result
    decided before (an archive entry refused) goes into the report as it is."""
    report = IngestReport()
    # New files are written without an fsync each, then made durable together
    # before the caller commits: one fsync per file was an import's largest cost.
    written: list[Path] = []
    categories: dict[str, Category] = {}  # looked up once per batch
    for item in files:
        if isinstance(item, NewFile):
            item = _store(
                item,
                session=session,
                status=status,
                source=source,
                device_id=device_id,
                uploaded_by=uploaded_by,
                create_category=create_category,
                written=written,
                categories=categories,
            )
        report.results.append(item)
    sync_files(written)
    assign_splits(session=session)
    return report


def ingest_bytes(data: bytes, filename: str, *, session: Session, category: str, **options) -> IngestResult:
    """Check and store one file (`ingest_files`' options apply). Bad files are refused, not raised."""
    return ingest_files([NewFile(data, filename, category)], session=session, **options).results[0]


def _store(
    file: NewFile,
    *,
    session: Session,
    status: ImageStatus,
    source: ImageSource,
    device_id: str | None,
    uploaded_by: str | None,
    create_category: bool,
    written: list[Path],
    categories: dict[str, Category],
) -> IngestResult:
    name = safe_filename(file.filename)
    try:
        checked = check_image(file.data, name)
    except InvalidImageError as exc:
        return IngestResult(name, "refused", reason=str(exc))
    digest = hashlib.sha256(file.data).hexdigest()
    existing = session.exec(select(TrainingImage).where(TrainingImage.sha256 == digest)).first()
    if existing is not None:
        return IngestResult(name, "duplicate", image_id=existing.id)
    cat = categories.get(file.category) or get_or_create_category(
        file.category, session=session, create=create_category
    )
    categories[file.category] = cat
    settings = get_settings()
    target = settings.images_dir / digest[:2] / f"{digest}{_FORMAT_SUFFIX[checked.format]}"
    if target.exists():
        # A file without a row (yet) is swept once it is old: this one is in use again.
        os.utime(target)
    else:
        write_atomic(target, file.data, durable=False)
        written.append(target)
    crash_point("ingest.file_written")
    image = TrainingImage(
        sha256=digest,
        # Relative to DATA_DIR, so the data folder can move.
        path=target.relative_to(settings.data_dir).as_posix(),
        original_filename=name,
        category_id=cat.id,
        status=status,
        source=source,
        device_id=device_id,
        width=checked.width,
        height=checked.height,
        size_bytes=len(file.data),
        uploaded_by=uploaded_by,
        phash=checked.phash,
    )
    session.add(image)
    session.flush()
    session.add(LookAlikeThumb(image_id=image.id, pixels=checked.thumb))
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
    files = (
        NewFile(path.read_bytes(), path.name, sub.name)
        for sub in subdirs
        for path in sorted(p for p in sub.rglob("*") if p.is_file() and not p.name.startswith("."))
    )
    return ingest_files(files, session=session, status=status, source=source, uploaded_by=uploaded_by)


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
    """Import a .zip of category folders (`zip_files`)."""
    files = zip_files(data, default_category=default_category)
    return ingest_files(files, session=session, status=status, source=source, uploaded_by=uploaded_by)


def zip_files(data: bytes, *, default_category: str | None = None) -> Iterator[NewFile | IngestResult]:
    """The files of a .zip of category folders, one at a time (loose files go to
    `default_category`); entries outside its root, too big or damaged come as
    refused results. Raises UserError, before the first file, for an archive
    that is not a .zip or is over the limits."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UserError("The archive is not a valid .zip file") from None
    limit = get_settings().max_upload_bytes
    with archive:
        _check_archive_size(archive.infolist())
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                yield IngestResult(info.filename, "refused", reason=f"{info.filename}: path leaves the archive's root")
                continue
            if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            category = parts[-2] if len(parts) >= 2 else default_category
            if category is None:
                yield IngestResult(info.filename, "refused", reason=f"{info.filename}: not inside a category folder")
                continue
            if info.file_size > limit:
                reason = f"{info.filename}: {info.file_size / 2**20:.1f} MB is over the {limit / 2**20:.1f} MB limit"
                yield IngestResult(info.filename, "refused", reason=reason)
                continue
            try:
                content = archive.read(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
                # A damaged entry (bad CRC, truncated, unknown compression) is refused
                # like a bad image; the rest of the archive still goes in.
                reason = f"{info.filename}: damaged in the archive ({exc}); make the .zip again"
                yield IngestResult(info.filename, "refused", reason=reason)
                continue
            yield NewFile(content, info.filename, category)


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
