"""Each page on its own (`AppTest.from_file`), on a temporary data folder with real data."""

import io
import zipfile

import pytest
from sqlmodel import Session, select
from streamlit.testing.v1 import AppTest

from core.db import read_session
from core.models import ImageStatus, TrainingImage
from core.review import add_category, validated_counts
from tests.conftest import ROOT, _clear_caches
from tests.factories import add_demo, add_images, image_bytes


def app(script: str) -> AppTest:
    return AppTest.from_file(str(ROOT / script), default_timeout=60)


def ok(target) -> AppTest:
    """Run (an AppTest, or the AppTest of a widget just set) and fail on any
    exception the page raised."""
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


# --- one real finished round, shared by the pages that show results ------------


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A data folder with the demo images (12 per category, 32 px) and one
    really trained round (1 epoch at 32 px) that made model 1.0.0."""
    from core import training
    from core.db import get_engine

    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_DIR", str(folder))
        mp.delenv("DATABASE_URL", raising=False)
        _clear_caches()
        with Session(get_engine(), expire_on_commit=False) as session:
            add_demo(session, per_category=12, size=32)
            round_ = training.start_training(
                {"epochs": 1, "batch_size": 16, "image_size": 32}, session=session, requested_by="fixture"
            )
            session.commit()
            version = training.run_training_round(round_.id, session=session)
        assert version is not None and version.version == "1.0.0"
        _clear_caches(bind_queue=False)
    return folder


@pytest.fixture
def trained(trained_folder, monkeypatch) -> Session:
    from core.db import get_engine

    monkeypatch.setenv("DATA_DIR", str(trained_folder))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    _clear_caches()
    with Session(get_engine(), expire_on_commit=False) as session:
        yield session
    _clear_caches(bind_queue=False)


# --- frame and overview -------------------------------------------------------


def test_dashboard_frame_shows_production_model_and_queue_in_the_sidebar(trained):
    at = ok(app("dashboard.py"))
    sidebar_metrics = {m.label: m.value for m in at.sidebar.metric}
    assert sidebar_metrics["Production model"] == "1.0.0"
    assert any("0 job(s) queued" in c.value for c in at.sidebar.caption)
    assert at.sidebar.text_input(key="user_name").value == "dashboard user"
    # The default page is the overview.
    assert at.title[0].value == "Overview"


def test_overview_empty_state_loads_the_demo_dataset_with_its_button(session):
    at = ok(app("pages/overview.py"))
    assert "No images yet" in at.info[0].value
    ok(at.button[0].click())
    assert [img.status for img in _images().values()] == [ImageStatus.validated] * 300
    assert {m.label for m in at.metric} >= {"Production model", "Validated images"}
    assert not at.info or "No images yet" not in at.info[0].value


def test_overview_shows_production_version_accuracy_and_charts(trained):
    at = ok(app("pages/overview.py"))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Production model"] == "1.0.0"
    assert metrics["Validation accuracy"].endswith("%")
    assert metrics["Last training"] == "completed"
    assert charts(at) == 3  # accuracy per version, dataset over time, distribution
    assert any("made model **1.0.0**" in m.value for m in at.markdown)


# --- review -------------------------------------------------------------------


def _images() -> dict[int, TrainingImage]:
    """The images as stored now (a read session: the test's own session would
    hold SQLite's write lock while the page writes)."""
    with read_session() as reader:
        return {img.id: img for img in reader.exec(select(TrainingImage))}


def test_review_validates_rejects_and_relabels_ticked_images_recording_who(session):
    ids = add_images(session, {"cats": 3, "dogs": 2}, status=ImageStatus.pending)
    at = app("pages/review.py")
    at.session_state["user_name"] = "Ada"
    ok(at)
    assert len(at.image) == 5
    assert {m.label: m.value for m in at.metric}["Pending"] == "5"

    at.checkbox(key=f"pick_{ids[0]}").check()
    at.checkbox(key=f"pick_{ids[1]}").check()
    ok(at)
    ok(at.button(key="validate").click())
    images = _images()
    assert images[ids[0]].status == images[ids[1]].status == ImageStatus.validated
    assert images[ids[0]].reviewed_by == "Ada" and images[ids[0]].reviewed_at is not None
    assert images[ids[2]].status == ImageStatus.pending
    assert "2 image(s) validated." in at.success[0].value
    assert {m.label: m.value for m in at.metric}["Validated"] == "2"
    assert not at.checkbox(key=f"pick_{ids[0]}").value  # the selection is cleared

    ok(at.checkbox(key=f"pick_{ids[2]}").check())
    ok(at.button(key="reject").click())
    assert _images()[ids[2]].status == ImageStatus.rejected

    ok(at.checkbox(key=f"pick_{ids[3]}").check())
    at.selectbox(key="relabel_to").select("cats")
    ok(at.button(key="relabel").click())
    images = _images()
    assert images[ids[3]].category_id == images[ids[0]].category_id
    assert "moved to 'cats'" in at.success[0].value


def test_review_filters_by_status_and_category_and_pages_the_grid(session):
    add_demo(session, per_category=6, size=32, status=ImageStatus.pending)
    at = ok(app("pages/review.py"))
    assert len(at.image) == 24  # first page of 30
    assert at.get("pagination")[0].num_pages == 2
    ok(at.get("pagination")[0].select(2))
    assert len(at.image) == 6

    ok(at.selectbox(key="filter_category").select("star"))
    assert len(at.image) == 6
    assert all("star" in c.label for c in at.checkbox if c.key.startswith("pick_"))
    ok(at.selectbox(key="filter_status").select("validated"))
    assert len(at.image) == 0
    assert "0 image(s) match" in at.caption[0].value


def test_review_upload_stores_good_files_and_lists_the_refused_ones_with_a_reason(session):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("birds/one.png", image_bytes((10, 200, 10)))
        zf.writestr("birds/broken.png", b"not an image")
    add_category("fish", session=session)
    session.commit()
    at = ok(app("pages/review.py"))
    at.file_uploader(key="upload_files").set_value(
        [
            ("red.png", image_bytes((250, 0, 0)), "image/png"),
            ("blue.png", image_bytes((0, 0, 250)), "image/png"),
            ("notes.png", b"plain text", "image/png"),
            ("set.zip", archive.getvalue(), "application/zip"),
            ("bad.zip", b"not a zip", "application/zip"),
        ]
    )
    at.selectbox(key="upload_category").select("fish")
    ok(at)
    ok(at.button(key="upload").click())
    assert "3 stored, 0 duplicates, 3 refused" in at.success[0].value
    refused = at.dataframe[0].value
    reasons = dict(zip(refused["file"], refused["reason"], strict=True))
    assert "not an image" in reasons["notes.png"] and "not an image" in reasons["broken.png"]
    assert "not a valid .zip" in reasons["bad.zip"]
    rows = list(_images().values())
    assert len(rows) == 3 and all(r.status == ImageStatus.pending for r in rows)


def test_review_categories_add_rename_and_warn_about_a_small_category(session):
    add_images(session, {"cats": 10, "dogs": 9, "owls": 1})
    at = ok(app("pages/review.py"))
    assert any("'owls' has 1 validated images" in w.value for w in at.warning)
    assert charts(at) == 1

    at.text_input(key="new_category").input("eagles")
    ok(at.get("form_submit_button")[0].click())
    at.selectbox(key="rename_from").select("owls")
    at.text_input(key="rename_to").input("barn owls")
    ok(at.get("form_submit_button")[1].click())
    with read_session() as reader:
        assert validated_counts(session=reader) == {"barn owls": 1, "cats": 10, "dogs": 9, "eagles": 0}
