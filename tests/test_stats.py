"""core.stats, core.thumbnails and core.uploads: what the dashboard pages read and call."""

import io
import zipfile
from datetime import timedelta

import pytest
from PIL import Image
from sqlmodel import select

from core import image_views, quality_views, round_views
from core.errors import UserError
from core.models import ImageStatus, ModelVersion, RoundStatus, TrainingImage, TrainingRound, utcnow
from core.thumbnails import thumbnail, thumbnail_path
from core.uploads import ingest_uploads
from tests.factories import add_images, as_actor, image_bytes


def test_find_images_filters_and_pages_newest_first(session):
    ids = add_images(session, {"cats": 5, "dogs": 3}, status=ImageStatus.pending)
    image = session.get(TrainingImage, ids[0])
    image.device_id, image.status = "phone-1", ImageStatus.validated
    session.commit()
    page = image_views.find_images(session=session, limit=3)
    assert page.total == 8 and [img.id for img, _ in page.rows] == ids[::-1][:3]
    assert image_views.find_images(session=session, category="dogs").total == 3
    assert image_views.find_images(session=session, status="validated", device="phone-1").total == 1
    today = utcnow().date()
    assert image_views.find_images(session=session, uploaded_from=today, uploaded_to=today).total == 8
    assert image_views.find_images(session=session, uploaded_to=today - timedelta(days=1)).total == 0
    assert image_views.filter_options(session=session) == {
        "categories": ["cats", "dogs"],
        "sources": ["upload"],
        "devices": ["phone-1"],
    }


def test_category_warnings_name_small_and_far_below_categories():
    warnings = image_views.category_warnings({"a": 100, "b": 90, "c": 10, "d": 1}, minimum=2)
    assert len(warnings) == 2
    assert "'c' has 10 validated images, far below the others" in warnings[0]
    assert "'d' has 1 validated images; training needs at least 2" in warnings[1]
    assert image_views.category_warnings({"a": 10, "b": 8}, minimum=2) == []


def test_dataset_over_time_is_cumulative_per_category_without_rejected_images(session):
    add_images(session, {"cats": 2, "dogs": 1})
    add_images(session, {"owls": 4}, status=ImageStatus.rejected)
    rows = image_views.dataset_over_time(session=session)
    assert [(r["category"], r["images"]) for r in rows] == [("cats", 2), ("dogs", 1)]


def test_queue_overview_lists_running_then_queued_with_position_then_finished(session):
    done = TrainingRound(
        status=RoundStatus.completed, started_at=utcnow() - timedelta(seconds=30), finished_at=utcnow()
    )
    running = TrainingRound(status=RoundStatus.in_progress, started_at=utcnow() - timedelta(seconds=10), progress=0.25)
    first, second = TrainingRound(), TrainingRound()
    session.add_all([done, running, first, second])
    session.commit()
    rows = round_views.queue_overview(session=session)
    assert [(r["round"], r["status"], r["position"]) for r in rows] == [
        (second.id, "queued", 2),
        (first.id, "queued", 1),
        (running.id, "in_progress", None),
        (done.id, "completed", None),
    ]
    assert rows[3]["duration_s"] == 30.0
    assert round_views.current_round(session=session).id == running.id
    assert round_views.queued_count(session=session) == 2
    elapsed, left = round_views.round_timing(running)
    assert 9 < elapsed < 20 and abs(left - 3 * elapsed) < 1


def test_compare_versions_gives_deltas_new_minus_old():
    def version(name, val, per_class):
        return ModelVersion(version=name, major=1, minor=0, patch=0, architecture="resnet18", image_size=32,
                            checkpoint_path="x", metrics={"val_accuracy": val, "per_class_accuracy": per_class})  # fmt: skip

    compared = quality_views.compare_versions(
        version("1.0.0", 80.0, {"a": 70.0, "b": 90.0}), version("1.1.0", 85.5, {"a": 75.0})
    )
    assert compared["summary"][0] == {"metric": "validation accuracy (%)", "1.0.0": 80.0, "1.1.0": 85.5, "delta": 5.5}
    assert compared["per_category"] == [
        {"category": "a", "1.0.0": 70.0, "1.1.0": 75.0, "delta": 5.0},
        {"category": "b", "1.0.0": 90.0, "1.1.0": None, "delta": None},
    ]


def test_thumbnail_is_made_once_keyed_by_hash_and_size(session):
    (image_id,) = add_images(session, {"cats": 1})
    image = session.get(TrainingImage, image_id)
    path = thumbnail(image, size=16)
    assert path == thumbnail_path(image.sha256, 16) and path.parent.parent.name == "thumbnails"
    with Image.open(path) as im:
        assert max(im.size) == 16
    made = path.stat().st_mtime_ns
    assert thumbnail(image, size=16).stat().st_mtime_ns == made  # reused, not redrawn
    assert thumbnail(image, size=24) != path


def test_uploads_keep_good_files_and_refuse_bad_ones_and_bad_archives(session):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("birds/b.png", image_bytes((1, 2, 3)))
        zf.writestr("loose.png", image_bytes((4, 5, 6)))
    report = ingest_uploads(
        [
            ("a.png", image_bytes((9, 9, 9))),
            ("bad.png", b"nope"),
            ("set.zip", archive.getvalue()),
            ("broken.zip", b"nope"),
        ],
        session=session,
        actor=as_actor(),
        category="fish",
    )
    assert report.summary() == "3 stored, 0 duplicates, 2 refused"
    assert {r.filename for r in report.refused} == {"bad.png", "broken.zip"}
    names = {img.original_filename: img for img in session.exec(select(TrainingImage))}
    assert names["loose.png"].category_id == names["a.png"].category_id  # loose files take the chosen category


def test_uploads_of_images_need_a_category(session):
    with pytest.raises(UserError, match="Choose a category"):
        ingest_uploads([("a.png", image_bytes())], session=session, actor=as_actor(), category=None)
