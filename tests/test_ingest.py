import io
import zipfile

import pytest
from PIL import Image
from sqlmodel import select

from core.errors import UserError
from core.ingest import check_image, import_folder, import_zip, ingest_bytes
from core.models import Category, ImageSource, ImageStatus, TrainingImage
from tests.factories import image_bytes, png_with_size


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


def test_a_damaged_zip_entry_is_refused_with_a_reason_and_the_rest_goes_in(session, data_dir):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("cat/good.png", image_bytes())
        archive.writestr("cat/bad.png", image_bytes(colour=(9, 9, 9)))
    damaged = bytearray(buffer.getvalue())
    # Flip one byte inside bad.png's stored data: its CRC no longer matches.
    with zipfile.ZipFile(io.BytesIO(bytes(damaged))) as archive:
        info = archive.getinfo("cat/bad.png")
    damaged[info.header_offset + 30 + len(info.filename) + 20] ^= 0xFF
    report = import_zip(bytes(damaged), session=session)
    assert report.count("stored") == 1
    assert [r.reason for r in report.refused] == [
        "cat/bad.png: damaged in the archive (cannot be unpacked intact); make the .zip again"
    ]
    assert len(stored(session)) == 1
