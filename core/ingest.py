"""Getting image files into the dataset: checked, content-addressed, deduplicated."""

import hashlib
import io
import logging
import multiprocessing
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from sqlalchemy import insert, update
from sqlmodel import Session, col, func, select

from core.config import get_settings
from core.db import make_engine
from core.duplicates import Representatives, fingerprint, one_blas_thread, saved_thumbs
from core.errors import FileTooLargeError, InvalidImageError, UserError, bounded_text
from core.faults import crash_point
from core.models import Category, ImageSource, ImageStatus, LookAlikeThumb, TrainingImage, utcnow
from core.splits import KeyAssigner, assign_splits
from core.storage import sync_files, write_atomic

log = logging.getLogger(__name__)

# Files checked, looked up and inserted together (`ingest_files`).
BATCH = 256
# Fewer files than this are checked in the calling process (`checker`).
PARALLEL_FROM = 64
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
            phash, thumb = fingerprint(oriented)
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
    parallel: bool = False,
) -> IngestReport:
    """Check and store each file (bad ones are refused, not raised), each new
    image with its representative and split key (`KeyAssigner`), then
    `assign_splits`. A result decided before (an archive entry refused) goes
    into the report as it is.

    Files go in `BATCH` at a time: checked together (with `parallel`, by a
    process per core: `checker`), looked up by SHA-256 in one query and
    inserted in one flush, which is what an import of 200,000 pictures needs
    (BENCHMARKS.md, "Scale")."""
    report = IngestReport()
    categories: dict[str, Category] = {}  # looked up once per import
    made: list[KeyAssigner] = []
    options = {
        "status": status,
        "source": source,
        "device_id": device_id,
        "uploaded_by": uploaded_by,
        "create_category": create_category,
    }
    remaining = iter(files)

    def assigner() -> KeyAssigner:
        """One for the whole import, made at the first new image (or when the checking processes start)."""
        if not made:
            made.append(KeyAssigner(session=session))
        return made[0]

    def share() -> tuple[str, list[int], np.ndarray]:
        """For the checking processes: the database and its representatives now."""
        return (session.get_bind().url.render_as_string(hide_password=False), *assigner().reps.share())

    # New files are written without an fsync each and made durable batch by
    # batch in a thread while the next batch goes on, all before the caller
    # commits: one fsync per file in line was an import's largest cost.
    with checker(parallel, share) as check, ThreadPoolExecutor(1, thread_name_prefix="ingest-fsync") as syncer:
        synced = []
        batch = list(islice(remaining, BATCH))
        checked = check(_to_check(batch))
        while batch:
            # The next batch is read and checked (by the pool) while this one is stored.
            following = list(islice(remaining, BATCH))
            checked_next = check(_to_check(following))
            written: list[Path] = []
            report.results.extend(
                _store_batch(
                    batch,
                    checked(),
                    session=session,
                    written=written,
                    categories=categories,
                    assigner=assigner,
                    **options,
                )
            )
            synced.append(syncer.submit(sync_files, written))
            batch, checked = following, checked_next
        for future in synced:
            future.result()
    # The new images have their keys; this gives the rest theirs (images
    # stored before keys existed) and test images to a category without any.
    assign_splits(session=session)
    return report


def _to_check(batch: list[NewFile | IngestResult]) -> list[tuple[bytes, str]]:
    return [(item.data, safe_filename(item.filename)) for item in batch if isinstance(item, NewFile)]


def ingest_bytes(data: bytes, filename: str, *, session: Session, category: str, **options) -> IngestResult:
    """Check and store one file (`ingest_files`' options apply). Bad files are refused, not raised."""
    return ingest_files([NewFile(data, filename, category)], session=session, **options).results[0]


@dataclass(frozen=True)
class Prepared:
    """One file checked (`check_image`) or refused, with its SHA-256 and, when
    the check was made by the pool (`checker`), its stored file: written
    there (`written`) or found there already, and its nearest
    representatives among those shared with the pool, scored
    (`Representatives.candidates`)."""

    checked: CheckedImage | InvalidImageError
    sha256: str = ""
    stored: Path | None = None
    written: bool = False
    candidates: tuple | None = None


def _target(digest: str, checked: CheckedImage) -> Path:
    """Where a file with this SHA-256 is stored (content-addressed)."""
    return get_settings().images_dir / digest[:2] / f"{digest}{_FORMAT_SUFFIX[checked.format]}"


def _keep(target: Path, data: bytes) -> bool:
    """Store `data` at `target` unless it is there; whether it was written."""
    if target.exists():
        # A file without a row (yet) is swept once it is old: this one is in use again.
        os.utime(target)
        return False
    write_atomic(target, data, durable=False)
    return True


def _prepare(data: bytes, filename: str, store: bool = False) -> Prepared:
    try:
        checked = check_image(data, filename)
    except InvalidImageError as exc:
        return Prepared(exc)
    digest = hashlib.sha256(data).hexdigest()
    if not store:
        return Prepared(checked, digest)
    target = _target(digest, checked)
    return Prepared(checked, digest, target, _keep(target, data))


# In a checking process (`checker`): the representatives shared with it.
_shared: Representatives | None = None


def _start_checking(url: str, ids: list[int], rows: np.ndarray) -> None:
    """A checking process's start: the representatives it searches and scores against."""
    global _shared
    # Not `read_session`: making its engine first brings the schema up to
    # date, in a write transaction, and the import holds the write lock.
    engine = make_engine(url, readonly=True)

    def thumbs_of(image_ids: list[int]) -> dict[int, bytes | None]:
        # Only those saved (and committed), the others None here (kept so, not
        # asked for again): `match` makes them itself.
        with Session(engine) as session:
            saved = saved_thumbs(image_ids, session=session)
        return {image_id: saved.get(image_id) for image_id in image_ids}

    _shared = Representatives.of((ids, rows), thumbs_of)


def _prepare_all(items: list[tuple[bytes, str]]) -> list[Prepared]:
    """`_prepare` (stored) for each file, then its `candidates` among the shared representatives."""
    prepared = [_prepare(data, name, True) for data, name in items]
    if _shared is None:
        return prepared
    good = [n for n, p in enumerate(prepared) if isinstance(p.checked, CheckedImage)]
    with one_blas_thread():
        found = _shared.candidates([(prepared[n].checked.phash, prepared[n].checked.thumb) for n in good])
    for n, candidates in zip(good, found, strict=True):
        prepared[n] = replace(prepared[n], candidates=candidates)
    return prepared


@contextmanager
def checker(
    parallel: bool, share: Callable[[], tuple[str, list[int], np.ndarray]] | None = None
) -> Iterator[Callable[[list[tuple[bytes, str]]], Callable[[], list[Prepared]]]]:
    """A function that starts checking (`_prepare`) a list of (bytes, file
    name) and gives a function that returns each one's `Prepared`, in
    order, when they are ready.

    Decoding, hashing and writing files are most of an import's work. With
    `parallel`, a list of `PARALLEL_FROM` files or more is checked, and its
    good files stored, by a pool of processes, one per core, started at the
    first such list and kept for the rest of the call (an orphan file of a
    call that fails is swept like any other: `remove_orphan_images`);
    shorter lists are checked here, with nothing to start, and stored as
    their rows are made. Only for callers whose `__main__` is guarded (the
    command line, the benchmarks): a spawned process imports the caller's
    main script again, and under Streamlit that is the page itself, so the
    dashboard and the API check their (small) uploads in their own process.
    Should the processes die all the same, the rest is checked here, with a
    warning in the log.

    `share` gives the database and its representatives (`Representatives.share`)
    when the processes start: they then also search and score each good
    file against those (`Prepared.candidates`), the most costly part of
    matching once a database has many images."""
    pool: ProcessPoolExecutor | None = None
    broken = False

    def here(items: list[tuple[bytes, str]]) -> list[Prepared]:
        return [_prepare(data, name) for data, name in items]

    def check(items: list[tuple[bytes, str]]) -> Callable[[], list[Prepared]]:
        nonlocal pool
        workers = os.cpu_count() or 1
        if not parallel or broken or len(items) < PARALLEL_FROM or workers < 2:
            return lambda: here(items)
        if pool is None:
            # Spawned, not forked: the server that calls this runs threads.
            pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=None if share is None else _start_checking,
                initargs=() if share is None else share(),
            )
        size = max(1, len(items) // (4 * workers))
        results = pool.map(_prepare_all, [items[k : k + size] for k in range(0, len(items), size)])

        def collected() -> list[Prepared]:
            nonlocal broken
            try:
                return [prepared for chunk in results for prepared in chunk]
            except BrokenProcessPool:
                # A process died (e.g. its start re-ran a main script that is
                # not guarded): the import goes on here, slower, not lost.
                log.warning("the import's checking processes stopped; checking in this process instead")
                broken = True
                return here(items)

        return collected

    try:
        yield check
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _store_batch(
    batch: list[NewFile | IngestResult],
    checks: list[Prepared],
    *,
    session: Session,
    status: ImageStatus,
    source: ImageSource,
    device_id: str | None,
    uploaded_by: str | None,
    create_category: bool,
    written: list[Path],
    categories: dict[str, Category],
    assigner: Callable[[], KeyAssigner],
) -> list[IngestResult]:
    """The results of one batch, in its order; the new images are flushed,
    with their thumbnails, representatives and split keys."""
    files = [(i, item, safe_filename(item.filename)) for i, item in enumerate(batch) if isinstance(item, NewFile)]
    prepared = dict(zip([i for i, _, _ in files], checks, strict=True))
    digests = {i: p.sha256 for i, p in prepared.items() if isinstance(p.checked, CheckedImage)}
    known = dict(
        session.exec(
            select(TrainingImage.sha256, TrainingImage.id).where(col(TrainingImage.sha256).in_(set(digests.values())))
        ).all()
    )
    results: list[IngestResult | None] = [item if isinstance(item, IngestResult) else None for item in batch]
    new: dict[str, dict] = {}  # this batch's new rows by SHA-256
    candidates: dict[str, tuple | None] = {}  # and their `Prepared.candidates`
    # Filled in once the flush has given the images their ids: (position, name, SHA-256).
    stored: list[tuple[int, str, str]] = []
    settings = get_settings()
    for i, file, name in files:
        outcome = prepared[i].checked
        if isinstance(outcome, InvalidImageError):
            results[i] = IngestResult(name, "refused", reason=str(outcome))
            continue
        digest = digests[i]
        if digest in known:
            results[i] = IngestResult(name, "duplicate", image_id=known[digest])
            continue
        stored.append((i, name, digest))
        if digest in new:  # a second copy of a file this batch stores: a duplicate of it
            continue
        cat = categories.get(file.category) or get_or_create_category(
            file.category, session=session, create=create_category
        )
        categories[file.category] = cat
        target = prepared[i].stored
        if target is None:
            target = _target(digest, outcome)
            wrote = _keep(target, file.data)
        else:
            wrote = prepared[i].written  # by the pool
        if wrote:
            written.append(target)
        crash_point("ingest.file_written")
        new[digest] = {
            "sha256": digest,
            # Relative to DATA_DIR, so the data folder can move.
            "path": target.relative_to(settings.data_dir).as_posix(),
            "original_filename": name,
            "category_id": cat.id,
            "status": status,
            "source": source,
            "device_id": device_id,
            "width": outcome.width,
            "height": outcome.height,
            "size_bytes": len(file.data),
            "uploaded_at": utcnow(),
            "uploaded_by": uploaded_by,
            "phash": outcome.phash,
            "thumb": outcome.thumb,
        }
        candidates[digest] = prepared[i].candidates
    ids: dict[str, int] = {}
    if new:
        # One INSERT for the batch, rows rather than objects: building 256
        # model objects cost more than inserting them.
        rows = [{k: v for k, v in row.items() if k != "thumb"} for row in new.values()]
        inserted = session.scalars(
            insert(TrainingImage).returning(TrainingImage.id, sort_by_parameter_order=True), rows
        ).all()
        ids = dict(zip(new, inserted, strict=True))
        session.execute(
            insert(LookAlikeThumb), [{"image_id": ids[digest], "pixels": row["thumb"]} for digest, row in new.items()]
        )
        placed = assigner().place(
            [(ids[d], row["category_id"], row["phash"], row["thumb"]) for d, row in new.items()],
            [candidates[d] for d in new],
        )
        session.execute(
            update(TrainingImage),
            [
                {"id": ids[digest], "representative_id": representative_id, "split_key": key}
                for digest, (representative_id, key) in zip(new, placed, strict=True)
            ],
        )
    first: set[str] = set()
    for i, name, digest in stored:
        outcome = "duplicate" if digest in first else "stored"
        first.add(digest)
        results[i] = IngestResult(name, outcome, image_id=ids[digest])
    return results


def import_folder(
    folder: Path,
    *,
    session: Session,
    status: ImageStatus = ImageStatus.pending,
    source: ImageSource = ImageSource.import_,
    uploaded_by: str | None = None,
    parallel: bool = False,
) -> IngestReport:
    """Import `folder/<category>/<image>` (torchvision's ImageFolder layout);
    `parallel` as for `ingest_files`."""
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
    return ingest_files(
        files, session=session, status=status, source=source, uploaded_by=uploaded_by, parallel=parallel
    )


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
