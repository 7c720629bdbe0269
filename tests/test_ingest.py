import io
import zipfile

import pytest
from PIL import Image
from sqlmodel import select

from core.errors import UserError
from core.ingest import check_image, import_folder, import_zip, ingest_bytes
from core.models import Category, ImageSource, ImageStatus, TrainingImage
from tests.factories import distinct_images, image_bytes, png_with_size


def stored(session):
    return list(session.exec(select(TrainingImage)))


def test_valid_image_is_stored_content_addressed(session, data_dir):
    data = image_bytes(size=(40, 30))
    result = ingest_bytes(data, "cat.png", session=session, category="cat")
    assert result.outcome == "stored"
    image = session.get(TrainingImage, result.image_id)
    assert (image.width, image.height) == (40, 30)
    assert image.status == ImageStatus.pending
    path = data_dir / image.path
    assert path.read_bytes() == data
    assert image.sha256 in path.name


def test_second_copy_of_same_bytes_is_recognised_not_stored_twice(session, data_dir):
    data = image_bytes()
    first = ingest_bytes(data, "a.png", session=session, category="cat")
    second = ingest_bytes(data, "b.png", session=session, category="dog")
    assert second.outcome == "duplicate" and second.image_id == first.image_id
    assert len(stored(session)) == 1
    assert len(list((data_dir / "images").rglob("*.png"))) == 1


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not an image"),
        (image_bytes(fmt="PNG", size=(64, 64), compress_level=0)[:-2000], "damaged or truncated"),
        (bytes(range(256)) * 8, "not an image"),
        (image_bytes(fmt="JPEG", size=(64, 64))[:300], "damaged or truncated"),
        (png_with_size(30000, 30000), "decompression bomb"),
    ],
    ids=["empty", "garbage-after-png-magic", "truncated-png", "random-bytes", "truncated-jpeg", "decompression-bomb"],
)
def test_bad_files_are_refused_with_reason_and_change_nothing(session, data_dir, data, expected):
    result = ingest_bytes(data, "photo.jpg", session=session, category="cat")
    assert result.outcome == "refused"
    assert expected in result.reason
    assert "photo.jpg" in result.reason
    assert stored(session) == []
    assert list(session.exec(select(Category))) == []
    assert not (data_dir / "images").exists()


def test_file_over_size_limit_is_refused(session, monkeypatch):
    from core.config import get_settings

    monkeypatch.setenv("MAX_UPLOAD_BYTES", "2048")
    get_settings.cache_clear()
    result = ingest_bytes(b"x" * 5000, "big.jpg", session=session, category="cat")
    assert result.outcome == "refused"
    assert "limit" in result.reason and "MB" in result.reason


def test_exif_orientation_is_applied_to_recorded_size():
    im = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", exif=exif.tobytes())
    checked = check_image(buffer.getvalue())
    assert (checked.width, checked.height) == (20, 60)


def test_filename_with_parent_path_is_reduced_to_its_name(session, data_dir):
    result = ingest_bytes(image_bytes(), "../../etc/passwd.png", session=session, category="cat")
    image = session.get(TrainingImage, result.image_id)
    assert image.original_filename == "passwd.png"
    assert (data_dir / image.path).resolve().is_relative_to(data_dir.resolve())


def test_unknown_category_is_refused_when_creation_is_not_allowed(session):
    with pytest.raises(UserError, match="Unknown category 'bird'"):
        ingest_bytes(image_bytes(), "a.png", session=session, category="bird", create_category=False)


def test_import_folder_uses_subfolders_as_categories(session, tmp_path):
    root = tmp_path / "dataset"
    for i, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for j in range(3):
            (root / name / f"{j}.png").write_bytes(image_bytes(colour=(i * 100, j * 50, 0)))
    (root / "dog" / "notes.txt").write_text("not an image")
    report = import_folder(root, session=session, status=ImageStatus.validated)
    assert report.count("stored") == 6
    assert [r.filename for r in report.refused] == ["notes.txt"]
    images = stored(session)
    assert {i.status for i in images} == {ImageStatus.validated}
    assert {i.source for i in images} == {ImageSource.import_}
    assert {c.name for c in session.exec(select(Category))} == {"cat", "dog"}


def test_import_folder_defaults_to_pending(session, tmp_path):
    (tmp_path / "d" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "cat" / "a.png").write_bytes(image_bytes())
    import_folder(tmp_path / "d", session=session)
    assert stored(session)[0].status == ImageStatus.pending


def test_import_folder_without_subfolders_says_what_layout_is_expected(session, tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(image_bytes())
    with pytest.raises(UserError, match="sub-folder"):
        import_folder(tmp_path / "flat", session=session)


def test_zip_entries_outside_the_root_are_refused(session, data_dir):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat/good.png", image_bytes())
        archive.writestr("../evil/escape.png", image_bytes(colour=(1, 2, 3)))
        archive.writestr("/abs/cat/x.png", image_bytes(colour=(4, 5, 6)))
    report = import_zip(buffer.getvalue(), session=session)
    assert report.count("stored") == 1
    assert len(report.refused) == 2
    assert all("leaves the archive" in r.reason for r in report.refused)
    assert not (data_dir.parent / "evil").exists()


def test_not_a_zip_is_a_clear_error(session):
    with pytest.raises(UserError, match="not a valid .zip"):
        import_zip(b"hello", session=session)


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [("MAX_ARCHIVE_BYTES", "1048576", "unpacks to 4 MB; the limit is 1 MB"), ("MAX_ARCHIVE_ENTRIES", "3", "4 entries")],
)
def test_a_zip_over_the_archive_limits_is_refused_before_anything_is_decompressed(
    session, data_dir, monkeypatch, setting, value, expected
):
    from core.config import get_settings
    from core.uploads import ingest_uploads
    from tests.factories import as_actor

    monkeypatch.setenv(setting, value)
    get_settings.cache_clear()
    # Four entries of 1 MB of zeros: a few KB compressed.
    bomb = _zip({f"cat/{i}.png": bytes(2**20) for i in range(4)})
    assert len(bomb) < 50_000
    decompressed = []
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, info: decompressed.append(info) or b"")
    report = ingest_uploads([("bomb.zip", bomb)], session=session, actor=as_actor(), category=None)
    assert report.count("refused") == 1 and expected in report.refused[0].reason
    assert "split it into smaller archives" in report.refused[0].reason
    assert decompressed == [] and stored(session) == []


def test_a_zip_entry_with_a_bad_crc_is_refused_and_leaves_no_file(session, data_dir):
    good, bad = image_bytes(), image_bytes(colour=(1, 2, 3))
    data = bytearray(_zip({"cat/good.png": good, "cat/bad.png": bad}, compression=zipfile.ZIP_STORED))
    start = data.index(bad)
    data[start + len(bad) // 2] ^= 0xFF  # damage the stored bytes, not the directory
    report = import_zip(bytes(data), session=session)
    assert report.count("stored") == 1
    assert "cat/bad.png: damaged" in report.refused[0].reason and "CRC" in report.refused[0].reason
    files = [p for p in (data_dir / "images").rglob("*") if p.is_file()]
    assert [p.name for p in files] == [p.name for p in (data_dir / i.path for i in stored(session))]


def _batch_of_files(n: int) -> list:
    """n different pictures with, among them, a repeat of the first and a file
    that is not an image, so that every outcome crosses a batch boundary."""
    from core.ingest import NewFile

    files = [NewFile(data, f"{i}.png", "cat" if i % 2 else "dog") for i, data in enumerate(distinct_images(n))]
    files.insert(n // 2, NewFile(files[0].data, "again.png", "cat"))
    files.insert(n // 2 + 1, NewFile(b"not an image", "notes.txt", "cat"))
    return files


@pytest.mark.parametrize("parallel", [False, True])
def test_files_in_several_batches_keep_their_order_outcomes_and_ids(session, data_dir, monkeypatch, parallel):
    """Batches of 8: every file's outcome in its place, copies point at the
    image stored first, each image has its file, its thumbnail and a split
    key. With `parallel` in this test process, whose main module an earlier
    AppTest may have left as a page script, the checking processes may die
    at their start: the import then goes on in this process (the real pool
    is driven by `python -m cli import` in the next test)."""
    from core import ingest
    from core.models import LookAlikeThumb

    monkeypatch.setattr(ingest, "BATCH", 8)
    monkeypatch.setattr(ingest, "PARALLEL_FROM", 4)
    files = _batch_of_files(30)
    report = ingest.ingest_files(files, session=session, parallel=parallel)
    session.commit()
    outcomes = [r.outcome for r in report.results]
    assert len(outcomes) == 32
    assert outcomes.count("stored") == 30 and outcomes[15:17] == ["duplicate", "refused"]
    assert report.results[15].image_id == report.results[0].image_id
    assert "not an image" in report.results[16].reason
    assert [r.filename for r in report.results] == [f.filename for f in files]
    images = {image.id: image for image in stored(session)}
    assert len(images) == 30
    for result, file in zip(report.results, files, strict=True):
        if result.outcome == "stored":
            image = images[result.image_id]
            assert (data_dir / image.path).read_bytes() == file.data
            assert session.get(LookAlikeThumb, image.id) is not None
            assert image.split_key is not None and image.phash is not None


def test_a_copy_within_one_batch_is_a_duplicate_of_the_first(session):
    from core.ingest import NewFile, ingest_files

    data = image_bytes()
    report = ingest_files([NewFile(data, "a.png", "cat"), NewFile(data, "b.png", "dog")], session=session)
    assert [r.outcome for r in report.results] == ["stored", "duplicate"]
    assert report.results[1].image_id == report.results[0].image_id
    assert len(stored(session)) == 1


def test_the_representatives_read_before_are_read_again_when_the_database_changed_under_them(session, data_dir):
    """The process keeps the look-alike index between imports; a rolled-back
    representative whose id a different picture then takes must not stay in it."""
    import faiss
    import numpy as np

    from bench import datasets
    from core import duplicates

    pictures, _ = datasets.photos()
    loaded = lambda: duplicates.Representatives.load(session=session, thumbs_of=dict.fromkeys)  # noqa: E731

    def indexed(reps):
        return [reps.ids, faiss.vector_to_array(reps.index.xb).reshape(-1, duplicates.CODE_BYTES).tolist()]

    def in_database():
        rows = session.exec(
            select(TrainingImage.id, TrainingImage.phash)
            .where(TrainingImage.representative_id == TrainingImage.id)
            .order_by(TrainingImage.id)
        ).all()
        rows = [r for r in rows if not duplicates.featureless(r[1])]
        return [[r[0] for r in rows], duplicates.codes(r[1] for r in rows).tolist()]

    ingest_bytes(datasets.png(pictures[0]), "0.png", session=session, category="photo")
    session.commit()
    assert indexed(loaded()) == in_database()
    ingest_bytes(datasets.png(pictures[1]), "1.png", session=session, category="photo")
    assert indexed(loaded()) == in_database()  # read again with the new one
    session.rollback()
    ingest_bytes(datasets.png(pictures[2]), "2.png", session=session, category="photo")  # takes the same id
    session.commit()
    assert indexed(loaded()) == in_database()
    assert np.array_equal(np.array(in_database()[0]), np.array([1, 2]))


def test_the_command_lines_import_checks_on_every_core_with_the_same_outcomes(data_dir, session, tmp_path):
    """`python -m cli import` (a real pool of processes: 100 files, over
    PARALLEL_FROM): stored, duplicate and refused as a serial import says,
    each image with its file, thumbnail and split key."""
    from core.models import LookAlikeThumb
    from tests.servers import run_cli

    folder = tmp_path / "incoming"
    for category in ("cat", "dog"):
        (folder / category).mkdir(parents=True)
    pictures = distinct_images(100)
    for n, data in enumerate(pictures):
        (folder / ("cat" if n % 2 else "dog") / f"{n:03}.png").write_bytes(data)
    (folder / "cat" / "zz_again.png").write_bytes(pictures[0])
    (folder / "cat" / "zz_notes.png").write_bytes(b"not an image")
    result = run_cli("import", str(folder))
    out = result.stdout
    assert "checking in this process instead" not in result.stdout + result.stderr  # the pool did the work
    assert "100 stored, 1 duplicates, 1 refused" in out
    assert "zz_notes.png" in out
    images = stored(session)
    assert len(images) == 100
    assert {(data_dir / image.path).read_bytes() for image in images} == set(pictures)
    assert all(image.split_key is not None and image.phash is not None for image in images)
    assert all(session.get(LookAlikeThumb, image.id) is not None for image in images)
