"""Each page on its own (`AppTest.from_file`), on a temporary data folder with real data."""

import io
import json
import re
import time
import zipfile

import pytest
from sqlmodel import Session, select
from streamlit.testing.v1 import AppTest

from core.db import read_session, session_scope
from core.models import PHASES, ImageStatus, ModelVersion, RoundStatus, TrainingImage, TrainingRound
from core.review import add_category, validated_counts
from pages._common import md
from tests.conftest import ROOT, _clear_caches
from tests.factories import add_demo, add_images, add_user, as_actor, image_bytes, sign_in


def app(script: str, role: str | None = "admin", name: str | None = None) -> AppTest:
    """The page, run as a signed-in user with `role` (named after it unless
    `name` is given); `role=None` runs it signed out."""
    at = AppTest.from_file(str(ROOT / script), default_timeout=60)
    if role is not None:
        sign_in(at, user(name or f"{role} user", role))
    return at


def user(name: str, role: str):
    """The user `name` in the current database (created with `role` if new)."""
    from core.models import User

    with session_scope() as s:
        found = s.exec(select(User).where(User.name == name)).first()
        if found is None:
            found = add_user(s, name, role)
        return found


def ok(target) -> AppTest:
    """Run (an AppTest, or the AppTest of a widget just set) and fail on any
    exception the page raised."""
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def table(at: AppTest, column: str):
    """The first table (as a DataFrame) that has `column`."""
    for frame in at.dataframe:
        if column in frame.value.columns:
            return frame.value
    raise AssertionError(f"no table with a '{column}' column")


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


# --- one real finished round, shared by the pages that show results ------------


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A data folder with the demo images (12 per category, 32 px) and one
    really trained round (1 epoch at 32 px) that made model 1.0.0."""
    from core.db import get_engine
    from core.training.rounds import run_training_round, start_training

    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_DIR", str(folder))
        # One epoch on 60 pictures is no evidence the gate would accept for a
        # first version; these tests are about showing one in production.
        mp.setenv("AUTO_PROMOTE", "always")
        mp.delenv("DATABASE_URL", raising=False)
        _clear_caches()
        with Session(get_engine(), expire_on_commit=False) as session:
            add_demo(session, per_category=12, size=32)
            round_ = start_training(
                {"epochs": 1, "batch_size": 16, "image_size": 32}, session=session, requested_by="fixture"
            )
            session.commit()
            version = run_training_round(round_.id, session=session)
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
    assert any(c.value.startswith("test accuracy ") and "(n = " in c.value and "95% CI" in c.value
               for c in at.sidebar.caption)  # fmt: skip
    assert any("0 job(s) queued" in c.value for c in at.sidebar.caption)
    assert any("admin user" in m.value for m in at.sidebar.markdown)
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
    version = trained.exec(select(ModelVersion)).first()
    trained.rollback()
    # The card shows the figure whole; its images and interval are written under it.
    assert metrics["Test accuracy"] == f"{version.metrics['test_accuracy']:.1f}%"
    captions = [c.value for c in at.caption]
    assert any(
        c.startswith(f"{version.metrics['test_accuracy']:.1f}% (n = {version.metrics['test_images']}; 95% CI ")
        for c in captions
    ), captions
    assert metrics["Last training"] == "completed"
    assert charts(at) == 3  # accuracy per version, dataset over time, distribution
    assert any("made model **1.0.0**" in m.value for m in at.markdown)
    accuracy_chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert accuracy_chart["layout"]["legend"]["title"]["text"] == "accuracy on"


def test_overview_chart_marks_production_overrides_and_rollbacks_with_dates(session):
    import json

    from core import registry
    from core.models import utcnow

    ids = add_images(session, {"cat": 2, "dog": 2})
    truth = {i: ("cat" if n < 2 else "dog") for n, i in enumerate(ids)}
    _versions_scored_on(session, {"1.0.0": truth, "1.1.0": {i: "cat" for i in ids}, "1.2.0": truth})
    registry.promote("1.1.0", session=session, actor=as_actor(), reason="trying it")
    registry.promote("1.2.0", session=session, actor=as_actor())
    registry.rollback(session=session, actor=as_actor())
    session.commit()

    at = ok(app("pages/overview.py"))
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    today = f"{utcnow():%Y-%m-%d}"
    names = [trace["name"] for trace in spec["data"]]
    assert f"in production since {today}" in names
    notes = sorted(note["text"] for note in spec["layout"]["annotations"])
    assert notes == [f"gate overridden<br>{today}", f"rolled back from 1.2.0<br>{today}"]
    colours = {trace["name"]: trace["line"]["color"] for trace in spec["data"] if "line" in trace}
    assert colours["training"] == "#c8c8c8" and colours["test"] == "#1f4e9c"


# --- review -------------------------------------------------------------------


def _images() -> dict[int, TrainingImage]:
    """The images as stored now (a read session: the test's own session would
    hold SQLite's write lock while the page writes)."""
    with read_session() as reader:
        return {img.id: img for img in reader.exec(select(TrainingImage))}


def test_review_validates_rejects_and_relabels_ticked_images_recording_who(session):
    ids = add_images(session, {"cats": 3, "dogs": 2}, status=ImageStatus.pending)
    at = ok(app("pages/review.py", "curator", "Ada"))
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
    add_demo(session, per_category=12, size=32, status=ImageStatus.pending)
    at = ok(app("pages/review.py"))
    assert len(at.image) == 48  # first page of 60
    assert at.get("pagination")[0].num_pages == 2
    ok(at.get("pagination")[0].select(2))
    assert len(at.image) == 12

    ok(at.selectbox(key="filter_category").select("star"))
    assert len(at.image) == 12
    assert all("star" in c.label for c in at.checkbox if c.key.startswith("pick_"))
    ok(at.selectbox(key="filter_status").select("validated"))
    assert len(at.image) == 0
    assert "0 image(s) match" in at.caption[0].value


def test_review_ticks_survive_a_filter_change_with_a_note_and_act(session):
    ids = add_images(session, {"cats": 2, "dogs": 2}, status=ImageStatus.pending)
    cat, dog = ids[0], ids[2]
    at = ok(app("pages/review.py", "curator", "Ana"))
    ok(at.checkbox(key=f"pick_{cat}").check())
    ok(at.selectbox(key="filter_category").select("dogs"))
    assert f"1 ticked image(s) are not shown here (another page or filter): #{cat}" in at.info[0].value
    ok(at.checkbox(key=f"pick_{dog}").check())
    assert at.button(key="reject").label == "Reject (2)"
    ok(at.button(key="reject").click())
    assert "2 image(s) rejected." in at.success[0].value
    statuses = {i: img.status for i, img in _images().items()}
    assert statuses[cat] == statuses[dog] == ImageStatus.rejected
    assert at.button(key="reject").label == "Reject (0)" and not at.info


def test_review_history_finds_any_image_by_id(session):
    ids = add_images(session, {"cats": 50}, status=ImageStatus.pending)
    oldest = ids[0]  # newest first: not on the first page
    from core.review import set_status

    set_status([oldest], ImageStatus.validated, session=session, actor=as_actor("Ana", "curator"))
    session.commit()
    at = ok(app("pages/review.py", "curator", "Ana"))
    assert f"pick_{oldest}" not in [c.key for c in at.checkbox]
    ok(at.text_input(key="history_search").input(f"#{oldest}"))
    assert at.selectbox(key="history_image").value == oldest
    assert table(at, "action")["action"].tolist() == ["image.validate"]


def test_review_upload_stores_good_files_and_lists_the_refused_ones_with_a_reason(session):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("birds/one.png", image_bytes((10, 200, 10)))
        zf.writestr("birds/broken.png", b"not an image")
    add_category("fish", session=session, actor=as_actor())
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
    refused = table(at, "reason")
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


def test_review_categories_are_compared_ignoring_case_limited_to_printable_text_deleted_and_merged(session):
    from core.models import AuditEvent

    add_images(session, {"cats": 3, "dogs": 2})
    at = ok(app("pages/review.py", "curator", "Ana"))
    submit = {"add": 0, "rename": 1, "delete": 2, "merge": 3}

    def press(form: str) -> None:
        ok(at.get("form_submit_button")[submit[form]].click())

    at.text_input(key="new_category").input("eagles")
    press("add")
    assert "Category 'eagles' added." in [s.value for s in at.success]
    for refused, says in [("Cats", "Category 'cats' already exists"), ("../evil", "must be printable text")]:
        at.text_input(key="new_category").input(refused)
        press("add")
        assert says in at.error[0].value
    at.selectbox(key="delete_name").select("dogs")
    press("delete")
    assert "has 2 image(s), so it cannot be deleted: merge it" in at.error[0].value
    at.selectbox(key="delete_name").select("eagles")
    press("delete")
    assert "Category 'eagles' deleted." in [s.value for s in at.success]
    at.selectbox(key="merge_from").select("dogs")
    at.selectbox(key="merge_into").select("cats")
    press("merge")
    assert "'dogs' merged into 'cats'." in [s.value for s in at.success]
    with read_session() as reader:
        assert validated_counts(session=reader) == {"cats": 5}
        merge = reader.exec(select(AuditEvent).where(AuditEvent.action == "category.merge")).one()
    assert (merge.actor, merge.before["name"], len(merge.before["images"])) == ("Ana", "dogs", 2)
    assert merge.after == {"merged_into": "cats"}


# --- train --------------------------------------------------------------------


def test_train_is_disabled_with_the_reason_when_the_rules_are_not_met(session):
    add_images(session, {"cats": 3, "dogs": 1})
    at = ok(app("pages/train.py"))
    assert at.button(key="train").disabled
    problems = " ".join(e.value for e in at.error)
    assert "at least 50 validated images; there are 4" in problems
    assert "'dogs' has 1" in problems
    assert table(at, "validated")["validated"].tolist() == [3, 1]


def test_train_offers_auto_first_with_the_original_defaults_in_the_manual_section(session):
    at = ok(app("pages/train.py"))
    assert at.radio(key="training_mode").options[0].startswith("Auto (recommended)")
    assert at.radio(key="training_mode").value == "auto"
    values = {w.key: w.value for w in at.number_input}
    assert values["budget_minutes"] == 10.0
    assert (values["epochs"], values["batch_size"], values["learning_rate"]) == (20, 32, 0.001)
    assert (values["image_size"], values["val_split"], values["seed"]) == (None, 0.2, 42)  # image size: auto
    assert at.toggle(key="use_existing_model").value is True
    assert at.selectbox(key="architecture").value == "mobilenet_v3_small"
    assert at.expander[0].label == "Manual parameters"
    ok(at.radio(key="training_mode").set_value("full"))
    assert "budget_minutes" not in {w.key for w in at.number_input}


def test_train_in_auto_mode_queues_an_auto_round_with_the_budget_and_checks_it(session, monkeypatch):
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    at = ok(app("pages/train.py", "operator", "Grace"))
    ok(at.number_input(key="budget_minutes").set_value(0.01))
    assert at.button(key="train").disabled
    assert md("Time budget (minutes) must be between 0.1 and 1,440 (got 0.01)") in " ".join(e.value for e in at.error)
    ok(at.number_input(key="budget_minutes").set_value(3.0))
    ok(at.button(key="train").click())
    with read_session() as reader:
        job = reader.exec(select(TrainingRound)).one()
    assert job.parameters["training_mode"] == "auto" and job.parameters["budget_minutes"] == 3.0
    assert job.requested_parameters["image_size"] == "auto" and job.parameters["image_size"] == 32
    again = ok(app("pages/train.py", "operator", "Grace"))  # a later visit starts from that choice
    assert again.radio(key="training_mode").value == "auto"
    assert again.number_input(key="budget_minutes").value == 3.0
    assert again.number_input(key="image_size").value is None  # "auto", not the 32 px it chose


def test_train_with_image_size_left_on_auto_shows_and_records_the_choice(session, monkeypatch):
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=40)
    at = ok(app("pages/train.py", "operator", "Grace"))
    assert at.number_input(key="image_size").value is None
    shown = "Image size auto: 32 px, from the median short side (40 px) of the 20 validated images"
    assert any(md(shown) in info.value for info in at.info)
    ok(at.button(key="train").click())
    with read_session() as reader:
        job = reader.exec(select(TrainingRound)).one()
    assert job.parameters["image_size"] == 32 and any(shown in w for w in job.warnings)


def test_head_mode_without_a_backbone_disables_train_and_says_why(session, monkeypatch):
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    at = ok(app("pages/train.py"))
    assert not at.button(key="train").disabled
    ok(at.radio(key="training_mode").set_value("head"))
    assert at.button(key="train").disabled
    said = " ".join(e.value for e in at.error)
    assert "Training mode head trains only the classifier" in said
    # The rule across two fields, in words too (the form's labels, not code names).
    ok(at.number_input(key="processes").set_value(2))
    said = " ".join(e.value for e in at.error)
    assert "Training mode head runs in one process" in said and "use training mode full" in said
    assert not re.search(r"training_mode|use_existing_model|image_size", said)


def test_train_enqueues_a_round_with_the_form_values_and_cancel_cancels_it(session, monkeypatch):
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    at = ok(app("pages/train.py", "operator", "Grace"))
    at.radio(key="training_mode").set_value("full")
    at.number_input(key="epochs").set_value(1)
    at.number_input(key="image_size").set_value(32)
    at.toggle(key="use_existing_model").set_value(False)
    at.number_input(key="processes").set_value(2)
    ok(at)
    assert not at.button(key="train").disabled
    ok(at.button(key="train").click())

    with read_session() as reader:
        rounds = list(reader.exec(select(TrainingRound)))
    assert len(rounds) == 1
    job = rounds[0]
    assert job.status == RoundStatus.queued and job.requested_by == "Grace" and job.queue_task_id
    assert job.parameters["epochs"] == 1 and job.parameters["image_size"] == 32
    assert job.parameters["use_existing_model"] is False and job.parameters["processes"] == 2
    assert job.job_id[:8] in at.success[0].value and "processes 2" in at.success[0].value
    queue = table(at, "job_id")
    assert queue["job_id"].tolist() == [job.job_id] and queue["position"].tolist() == [1]

    ok(at.selectbox(key="cancel_job").select(job.job_id))
    ok(at.button(key="cancel").click())
    with read_session() as reader:
        assert reader.get(TrainingRound, job.id).status == RoundStatus.cancelled
    assert table(at, "job_id")["status"].tolist() == ["cancelled"]


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("epochs", 0, "Epochs must be between 1 and 500 (got 0)"),
        ("learning_rate", 5.0, "Learning rate must be between 1e-06 and 1 (got 5.0)"),
        ("image_size", 13, "Image size (px) must be between 32 and 512 (got 13)"),
        ("val_split", 0.99, "Validation split must be between 0.05 and 0.5 (got 0.99)"),
        ("seed", -1, "Seed must be between 0 and 2,147,483,647 (got -1)"),
        ("processes", 99, "Processes must be between 1 and MAX_TRAINING_PROCESSES="),
    ],
)
def test_an_invalid_field_disables_train_and_preflight_names_it(session, monkeypatch, key, value, says):
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    at = ok(app("pages/train.py", "operator"))
    assert not at.button(key="train").disabled
    ok(at.number_input(key=key).set_value(value))
    assert at.button(key="train").disabled
    assert md(says) in " ".join(e.value for e in at.error)
    assert not at.success


def test_the_confirmation_lists_the_parameters_queued_and_follows_the_jobs_state(session, monkeypatch):
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    at = ok(app("pages/train.py", "operator", "Grace"))
    at.radio(key="training_mode").set_value("full")
    at.number_input(key="epochs").set_value(3)
    ok(at.number_input(key="learning_rate").set_value(0.01))
    ok(at.button(key="train").click())
    with read_session() as reader:
        job = reader.exec(select(TrainingRound)).one()
    assert job.parameters["epochs"] == 3 and job.parameters["learning_rate"] == 0.01
    banner = at.success[0].value
    assert f"Round {job.id}" in banner and "**queued**" in banner
    assert "epochs 3" in banner and "learning rate 0.01" in banner
    assert "None" not in banner and "True" not in banner and "use existing model" in banner  # words, not Python
    with session_scope() as writer:
        done = writer.get(TrainingRound, job.id)
        done.status = RoundStatus.failed
        writer.add(done)
    ok(at)
    assert "**failed**" in at.error[0].value and not any("queued**" in s.value for s in at.success)


def test_the_form_starts_from_the_operators_last_job_and_trains_again_from_any_round(session, monkeypatch):
    from core.training.rounds import start_training

    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    mine = start_training({"epochs": 3, "image_size": 64}, session=session, requested_by="Grace")
    other = start_training({"epochs": 7, "seed": 5}, session=session, requested_by="Ada")
    session.commit()

    at = ok(app("pages/train.py", "operator", "Grace"))
    assert (at.number_input(key="epochs").value, at.number_input(key="image_size").value) == (3, 64)
    assert not [s for s in at.success if "Round" in s.value]  # no banner about a job this visit did not queue
    fresh = ok(app("pages/train.py", "operator", "Linus"))
    assert fresh.number_input(key="epochs").value == 20

    ok(at.selectbox(key="again_round").select(other.id))
    ok(at.button(key="train_again").click())
    assert (at.number_input(key="epochs").value, at.number_input(key="seed").value) == (7, 5)
    assert at.number_input(key="image_size").value is None  # Ada left it on "auto" (it chose 32 px)
    ok(at.selectbox(key="again_round").select(mine.id))
    ok(at.button(key="train_again").click())
    assert at.number_input(key="epochs").value == 3


def test_stop_and_keep_the_best_asks_a_running_job_to_stop_and_cancels_a_queued_one(session, monkeypatch):
    from core.training.rounds import start_training

    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    running = start_training({"epochs": 9}, session=session, requested_by="Ada")
    queued = start_training({"epochs": 9}, session=session, requested_by="Ada")
    running.status = RoundStatus.in_progress
    session.add(running)
    session.commit()
    at = ok(app("pages/train.py", "operator", "Grace"))
    ok(at.selectbox(key="cancel_job").select(running.job_id))
    ok(at.button(key="stop").click())
    ok(at.selectbox(key="cancel_job").select(queued.job_id))
    ok(at.button(key="stop").click())
    with read_session() as reader:
        now_running, now_queued = reader.get(TrainingRound, running.id), reader.get(TrainingRound, queued.id)
    assert now_running.status == RoundStatus.in_progress and now_running.stop_requested
    assert not now_running.cancel_requested
    assert "stop requested by Grace: keeping the best epoch so far" in now_running.history[-1]
    assert now_queued.status == RoundStatus.cancelled


def test_train_page_shows_automatic_retraining_and_saving_changes_the_settings(session):
    from core.models import Automation

    at = ok(app("pages/train.py", "operator", "Grace"))
    assert "Automatic retraining" in [h.value for h in at.subheader]
    shown = " ".join(m.value for m in at.markdown)
    assert "**New images:** off (0 of 100 new validated images)" in shown and "**Last check:** never" in shown
    assert at.toggle(key="auto_new_images_enabled").value is False
    assert "shared test images, significantly" in at.number_input(key="gate_min_improvement").help
    assert at.number_input(key="gate_min_test_images").value == 30

    at.toggle(key="auto_new_images_enabled").set_value(True)
    at.number_input(key="auto_new_images_threshold").set_value(25)
    at.number_input(key="gate_max_category_drop").set_value(3.0)
    at.number_input(key="gate_min_test_images").set_value(100)
    at.number_input(key="epochs").set_value(2)
    at.checkbox(key="auto_use_params").check()
    ok(at.button(key="auto_save").click())

    assert "settings saved" in at.success[0].value
    with read_session() as reader:
        row = reader.get(Automation, 1)
    assert (row.new_images_enabled, row.new_images_threshold, row.gate_max_category_drop) == (True, 25, 3.0)
    assert row.gate_min_test_images == 100
    assert row.parameters["epochs"] == 2 and row.updated_by == "Grace"
    assert "**New images:** on: 0 of 25 new validated images" in " ".join(m.value for m in at.markdown)


# --- live metrics ---------------------------------------------------------------


def test_metrics_page_shows_progress_and_curves_of_a_running_round(session):
    from core.models import EpochMetric, utcnow

    round_ = TrainingRound(
        parameters={"epochs": 4},
        status=RoundStatus.in_progress,
        started_at=utcnow(),
        current_epoch=2,
        current_batch=3,
        total_batches=5,
        progress=0.4,
    )
    session.add(round_)
    session.flush()
    session.add(EpochMetric(round_id=round_.id, epoch=1, train_loss=1.2, train_accuracy=40, val_loss=1.3,
                            val_accuracy=35, learning_rate=0.001, seconds=2.0))  # fmt: skip
    session.commit()
    at = ok(app("pages/metrics.py"))
    assert at.selectbox(key="round_id").value == round_.id
    assert "epoch 2/4, batch 3/5" in at.get("progress")[0].proto.text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Status"] == "in progress" and metrics["Time left (estimate)"] != "–"
    assert charts(at) == 2  # loss and accuracy per epoch


def test_elapsed_on_live_metrics_follows_the_clock_while_the_worker_is_silent(session, monkeypatch):
    """A busy worker writes no heartbeat or epoch for a while: Elapsed still
    counts from the start on every refresh (it froze in a browser under load)."""
    from datetime import timedelta

    from core import models, round_views
    from core.models import EpochMetric, utcnow

    now = utcnow()
    round_ = TrainingRound(parameters={"epochs": 3}, status=RoundStatus.in_progress, started_at=now - timedelta(seconds=100),
                           heartbeat_at=now - timedelta(seconds=60), current_epoch=2, progress=0.4)  # fmt: skip
    session.add(round_)
    session.flush()
    session.add(EpochMetric(round_id=round_.id, epoch=1, train_loss=1.2, train_accuracy=40, val_loss=1.3,
                            val_accuracy=35, learning_rate=0.001, seconds=30.0))  # fmt: skip
    session.commit()

    def elapsed(at) -> tuple[int, float]:
        """Elapsed as shown, and the most it may be beyond the clock's (a run takes seconds on a busy machine)."""
        began = time.monotonic()
        shown = {m.label: m.value for m in ok(at.run()).metric}["Elapsed"]
        minutes, seconds = re.fullmatch(r"(\d+)m (\d+)s", shown).groups()
        return int(minutes) * 60 + int(seconds), (utcnow() - now).total_seconds() + time.monotonic() - began + 1

    at = app("pages/metrics.py")
    shown, slack = elapsed(at)
    assert 100 <= shown <= 100 + slack  # not the 40 s up to the last heartbeat, nor the 30 s of the epoch

    # Five minutes later, still without a word from the worker.
    # The clock of the round's elapsed time (models) and of its phases (round_views).
    def later():
        return utcnow() + timedelta(minutes=5)

    monkeypatch.setattr(models, "utcnow", later)
    monkeypatch.setattr(round_views, "utcnow", later)
    shown, slack = elapsed(at)
    assert 400 <= shown <= 400 + slack


def _phases(start, **seconds) -> list[dict]:
    """Phases one after the other from `start`, each lasting its seconds; the last one given as None runs."""
    from datetime import timedelta

    out, at = [], start
    for name, length in seconds.items():
        end = None if length is None else at + timedelta(seconds=length)
        out.append({"name": name.replace("_", " "), "started_at": at.isoformat(),
                    "ended_at": end.isoformat() if end else None})  # fmt: skip
        at = end or at
    return out


def test_live_metrics_and_sidebar_show_the_phases_after_training_and_the_same_estimate(session):
    from datetime import timedelta

    from core.models import utcnow

    now = utcnow()
    earlier = now - timedelta(hours=1)
    done = TrainingRound(parameters={"epochs": 2}, status=RoundStatus.completed, started_at=earlier,
                         finished_at=earlier + timedelta(seconds=100), progress=1.0,
                         phases=_phases(earlier, preparing=5, training=40, exporting=20,
                                        checking_the_phone_files=15, scoring=10, registering=2))  # fmt: skip
    started = now - timedelta(seconds=90)  # exporting has run 35 s: longer than its 20 s last time
    running = TrainingRound(parameters={"epochs": 3}, status=RoundStatus.in_progress, started_at=started,
                            current_epoch=3, current_batch=5, total_batches=5, progress=1.0,
                            phases=_phases(started, preparing=5, training=50, exporting=None))  # fmt: skip
    session.add_all([done, running])
    session.commit()

    at = ok(app("pages/metrics.py"))
    assert at.get("progress")[0].proto.text == "exporting"
    left = {m.label: m.value for m in at.metric}["Time left (estimate)"]
    # exporting is over its time, so what is left is the phases to come, as long as last time: 15 + 10 + 2 s
    assert left == "0m 27s"
    phases = table(at, "phase")
    assert phases["state"].tolist() == ["done", "done", "running", "to come", "to come", "to come"]
    assert phases["progress"].tolist()[:3] == [1.0, 1.0, 0.99] and phases["seconds"][2] >= 35

    frame = ok(app("dashboard.py"))
    assert frame.sidebar.get("progress")[0].proto.text == f"Job {running.job_id[:8]}: exporting, about 0m 27s left"


def test_metrics_page_shows_results_of_a_finished_round(trained):
    at = ok(app("pages/metrics.py"))
    assert {m.label for m in at.metric} >= {"Validation accuracy", "Training accuracy", "Size", "Test accuracy"}
    shown = {m.label: m.value for m in at.metric}
    assert "95% CI" in shown["Test accuracy"] and "95% CI" in shown["Validation accuracy"]
    assert charts(at) == 4  # loss, accuracy, per category, confusion matrix
    by_source = table(at, "source")  # the test images by where they came from
    assert by_source["source"].tolist() == ["import"] and by_source["images"].sum() > 0
    assert table(at, "device")["device"].tolist() == ["none"]
    phases = table(at, "phase")  # recorded by the real round, each ended
    assert phases["phase"].tolist() == list(PHASES) and phases["state"].tolist() == ["done"] * len(PHASES)
    version = trained.exec(select(ModelVersion)).first()
    assert f"(n = {version.metrics['val_images']}; " in shown["Validation accuracy"]
    per_category = table(at, "accuracy (%)")  # validation images, with n per category
    assert per_category["images"].sum() == version.metrics["val_images"]
    assert any(f"({len(version.metrics['misclassified'])})" in m.value for m in at.markdown)
    assert len(at.image) == min(48, len(version.metrics["misclassified"]))
    round_ = trained.exec(select(TrainingRound)).first()
    assert round_.warnings and all(any(md(w) == shown.value for shown in at.warning) for w in round_.warnings)
    trained.rollback()


# --- models -------------------------------------------------------------------


def _production() -> list[str]:
    with read_session() as reader:
        return [v.version for v in reader.exec(select(ModelVersion).where(ModelVersion.is_production))]


def test_models_page_promotes_after_confirmation_and_rolls_back(trained):
    first = trained.exec(select(ModelVersion).where(ModelVersion.version == "1.0.0")).one()
    # A second version from the same round and files, with other metrics, so
    # there is something to promote without training twice.
    metrics = {**first.metrics, "val_accuracy": first.metrics["val_accuracy"] + 5}
    if not trained.exec(select(ModelVersion).where(ModelVersion.version == "1.1.0")).first():
        trained.add(ModelVersion(**{**first.model_dump(exclude={"id", "is_production", "promoted_at"}),
                                    "version": "1.1.0", "minor": 1, "metrics": metrics, "gate": None}))  # fmt: skip
        trained.commit()
    trained.rollback()

    at = ok(app("pages/models.py", "operator", "Linus"))
    listed = table(at, "snapshot_hash")
    assert listed["version"].tolist() == ["1.1.0", "1.0.0"]
    assert listed["production"].tolist() == [False, True]
    assert listed["test_images"].tolist() == [first.metrics["test_images"]] * 2
    assert listed["test_95_ci"].str.endswith("%").all() and listed["near_chance"].notna().all()
    why = table(at, "why").set_index("version")["why"]  # the first version stayed a candidate, saying why
    assert why["1.0.0"].startswith(f"not enough test images (n = {first.metrics['test_images']}, need 30)")
    assert {b.key for b in at.download_button} == {"download_ptl", "download_pte"}
    assert any("parity check passed" in m.value for m in at.markdown)

    ok(at.selectbox(key="promote_version").select("1.1.0"))
    ok(at.button(key="promote").click())
    assert any("Promote 1.1.0 to production?" in m.value for m in at.markdown)
    assert _production() == ["1.0.0"]  # nothing changes before the confirmation
    ok(at.button(key="confirm_yes").click())
    assert _production() == ["1.1.0"]
    assert "Model 1.1.0 is now in production." in at.success[0].value

    ok(at.button(key="rollback").click())
    ok(at.button(key="confirm_yes").click())
    assert _production() == ["1.0.0"]
    history = table(at, "action")
    assert history[["action", "from", "to", "by"]].values.tolist()[:2] == [
        ["rollback", "1.1.0", "1.0.0", "Linus"],
        ["promote", "1.0.0", "1.1.0", "Linus"],
    ]


def test_models_page_tries_a_version_on_a_dropped_picture_through_its_ptl(trained):
    from torch.jit.mobile import _load_for_lite_interpreter

    from core.config import get_settings
    from core.dataset import decode_image, normalize
    from core.ingest import image_path

    with read_session() as reader:  # the fixture's version (other tests add more to the shared folder)
        version = reader.exec(select(ModelVersion).where(ModelVersion.version == "1.0.0")).one()
        picture = image_path(reader.exec(select(TrainingImage)).first())
    ptl = next(a for a in version.artifacts if a["format"] == "ptl")
    phone = _load_for_lite_interpreter(str(get_settings().data_dir / ptl["path"]))
    expected = phone(normalize(decode_image(picture, version.image_size).unsqueeze(0))).softmax(1)[0]

    at = ok(app("pages/models.py", "viewer"))
    ok(at.selectbox(key="try_version").select("1.0.0"))
    ok(at.file_uploader(key="try_picture").set_value((picture.name, picture.read_bytes(), "image/png")))
    shown = table(at, "probability")
    assert shown["category"][0] == version.classes[int(expected.argmax())]
    assert shown["probability"][0] == pytest.approx(float(expected.max()), abs=1e-5)
    assert len(shown) == len(version.classes) and shown["probability"].sum() == pytest.approx(1.0, abs=1e-4)
    assert f"Model **1.0.0** says **{shown['category'][0]}**" in " ".join(m.value for m in at.markdown)

    ok(at.file_uploader(key="try_picture").set_value(("notes.png", b"plain text", "image/png")))
    assert "Cannot read that file as an image" in at.error[0].value


def test_models_page_asks_why_before_promoting_a_version_the_gate_held_back(trained):
    first = trained.exec(select(ModelVersion).where(ModelVersion.version == "1.0.0")).one()
    if not trained.exec(select(ModelVersion).where(ModelVersion.version == "1.2.0")).first():
        gate = {"passed": False, "production": "1.0.0", "reasons": ["category 'star' fell from 90.0% to 40.0%"]}
        trained.add(ModelVersion(**{**first.model_dump(exclude={"id", "is_production", "promoted_at"}),
                                    "version": "1.2.0", "minor": 2, "gate": gate}))  # fmt: skip
        trained.commit()
    trained.rollback()
    before = _production()

    at = ok(app("pages/models.py", "operator", "Grace"))
    gates = table(at, "why")
    assert "category 'star' fell" in gates.loc[gates["version"] == "1.2.0", "why"].item()
    assert charts(at) == 1  # test accuracy over time
    ok(at.selectbox(key="promote_version").select("1.2.0"))
    ok(at.button(key="promote").click())
    assert "1.2.0 did not pass the promotion gate (category 'star' fell" in at.warning[0].value
    ok(at.button(key="confirm_yes").click())  # no reason given
    assert "Give a reason" in at.error[0].value and _production() == before
    ok(at.text_input(key="override_reason").input("field test showed the old model fails on stars too"))
    ok(at.button(key="confirm_yes").click())
    assert _production() == ["1.2.0"]
    history = table(at, "reason")
    assert history[["action", "to", "by", "reason"]].values.tolist()[0] == [
        "promote (gate overridden)",
        "1.2.0",
        "Grace",
        "field test showed the old model fails on stars too",
    ]
    ok(at.button(key="rollback").click())
    ok(at.button(key="confirm_yes").click())
    assert _production() == before


def _versions_scored_on(session, predictions: dict[str, dict[int, str]]) -> None:
    """Fake versions (production first) whose recorded test predictions are given."""
    from core import gate, registry
    from tests.factories import add_fake_version

    for i, (name, predicted) in enumerate(predictions.items()):
        version = add_fake_version(session, name, production=False)
        gate.record_predictions(version, predicted, session=session)
        version.gate = {"passed": True, "reasons": []}
        session.add(version)
        if i == 0:
            registry.promote(name, session=session, actor=as_actor(), action="auto")
        session.commit()


def test_models_page_asks_why_before_promoting_a_much_worse_version_and_rollback_names_its_target(session):
    ids = add_images(session, {"cat": 5, "dog": 5})
    truth = {i: ("cat" if n < 5 else "dog") for n, i in enumerate(ids)}
    wrong = {i: ("dog" if label == "cat" else "cat") for i, label in truth.items()}
    _versions_scored_on(session, {"1.0.0": truth, "1.1.0": {**truth, **dict(list(wrong.items())[:6])}})

    at = ok(app("pages/models.py", "operator", "Grace"))
    assert (at.selectbox(key="compare_a").value, at.selectbox(key="compare_b").value) == ("1.0.0", "1.1.0")
    styled = [f.proto.arrow_data.styler.styles for f in at.dataframe if f.proto.arrow_data.styler.styles]
    assert styled and all("#c62828" in css for css in styled)  # the drops, in red
    ok(at.selectbox(key="promote_version").select("1.1.0"))
    ok(at.button(key="promote").click())
    assert "1.1.0 scores 60.0 points below production 1.0.0 (40.0% against 100.0%" in at.warning[0].value
    ok(at.button(key="confirm_yes").click())
    assert "Give a reason" in at.error[0].value and _production() == ["1.0.0"]
    ok(at.text_input(key="override_reason").input("the new camera's pictures need it"))
    ok(at.button(key="confirm_yes").click())
    assert _production() == ["1.1.0"]

    ok(at.button(key="rollback").click())
    assert "**Roll back from 1.1.0 to 1.0.0?**" in " ".join(m.value for m in at.markdown)
    ok(at.button(key="confirm_yes").click())
    assert _production() == ["1.0.0"]


def test_models_page_with_one_version_offers_no_comparison_with_itself(session):
    from tests.factories import add_fake_version

    add_fake_version(session, "1.0.0")
    at = ok(app("pages/models.py", "viewer"))
    assert "compare_a" not in [s.key for s in at.selectbox]
    assert "Only 1.0.0 so far: train another version to compare them." in [c.value for c in at.caption]


def test_models_page_keeps_near_chance_yes_no_beside_a_version_recorded_before_the_counts(session):
    from tests.factories import add_fake_version

    add_fake_version(session, "1.0.0")  # no test counts: near chance unknown
    counted = add_fake_version(session, "1.1.0", production=False)
    counted.metrics = {**counted.metrics, "test_accuracy": 50.0, "test_images": 40, "test_correct": 20,
                       "test_majority": 20}  # fmt: skip
    session.add(counted)
    session.commit()
    at = ok(app("pages/models.py", "viewer"))
    versions = table(at, "near_chance").set_index("version")["near_chance"]
    # A checkbox column: True for the counted one, a blank (not "") for the other.
    import pandas as pd

    assert bool(versions["1.1.0"]) is True
    assert pd.isna(versions["1.0.0"])


def test_models_page_sends_no_gate_decisions_beside_a_version_made_before_the_gate(session):
    """A version without a gate decision beside one with: the dicts stay out
    of the table (Arrow cannot send them beside blanks; seen at fleet scale)."""
    from tests.factories import add_fake_version

    add_fake_version(session, "1.0.0")
    gated = add_fake_version(session, "1.1.0", production=False)
    gated.gate = {"passed": False, "production": "1.0.0", "compared_on": 40, "reasons": ["not better"]}
    session.add(gated)
    session.commit()
    at = ok(app("pages/models.py", "viewer"))
    versions = table(at, "near_chance")
    assert "gate_decision" not in versions.columns
    assert dict(zip(versions["version"], versions["gate"], strict=True)) == {"1.0.0": "—", "1.1.0": "held back"}
    reasons = table(at, "why").set_index("version")["why"]
    assert reasons["1.1.0"] == "not better"


# --- sign-in, roles, admin and audit pages --------------------------------------


def test_nothing_but_the_sign_in_form_renders_until_someone_signs_in(session):
    add_user(session, "ana", "curator", password="right password")
    at = ok(app("dashboard.py", role=None))
    assert at.title[0].value == "Sign in"
    assert not at.sidebar.metric and not at.sidebar.button  # no production model, queue or sign-out yet
    at.text_input(key="sign_in_name").input("ana")
    at.text_input(key="sign_in_password").input("wrong password")
    ok(at.get("form_submit_button")[0].click())
    assert "Wrong user name or password." in at.error[0].value
    assert at.title[0].value == "Sign in"
    assert (at.text_input(key="sign_in_name").value, at.text_input(key="sign_in_password").value) == ("ana", "")

    at.text_input(key="sign_in_password").input("right password")
    ok(at.get("form_submit_button")[0].click())
    assert at.title[0].value == "Overview"
    assert any("**ana** · curator" in m.value for m in at.sidebar.markdown)
    ok(at.sidebar.button(key="sign_out").click())
    # (AppTest reruns the page last shown rather than the frame: that page stops, asking to sign in.)
    assert "session_token" not in at.session_state and not at.sidebar.button
    assert "Sign in" in at.info[0].value


def test_a_page_run_alone_without_sign_in_shows_nothing_but_the_hint(session):
    for script in ("pages/overview.py", "pages/review.py", "pages/train.py", "pages/models.py", "pages/admin.py"):
        at = ok(app(script, role=None))
        assert not at.title and "Sign in" in at.info[0].value, script


@pytest.mark.parametrize(
    ("role", "pages", "hidden"),
    [
        (
            "viewer",
            {"Overview", "Live metrics", "Models"},
            {"Review images", "Train", "Audit trail", "Users and tokens"},
        ),
        ("curator", {"Overview", "Review images", "Models"}, {"Train", "Audit trail", "Users and tokens"}),
        ("operator", {"Review images", "Train", "Audit trail"}, {"Users and tokens"}),
        ("admin", {"Review images", "Train", "Audit trail", "Users and tokens"}, set()),
    ],
)
def test_each_role_sees_only_the_pages_it_may_use(session, role, pages, hidden, monkeypatch):
    import streamlit as st

    seen = []
    real = st.navigation
    monkeypatch.setattr(st, "navigation", lambda sections, **kw: seen.append(sections) or real(sections, **kw))
    at = ok(app("dashboard.py", role))
    titles = {page.title for section in seen[-1].values() for page in section}
    assert pages <= titles and not hidden & titles, titles
    assert at.title[0].value == "Overview"


@pytest.mark.parametrize(
    ("script", "role"),
    [("pages/review.py", "viewer"), ("pages/train.py", "curator"), ("pages/audit.py", "curator"),
     ("pages/admin.py", "operator")],
)  # fmt: skip
def test_a_page_opened_by_a_role_that_may_not_use_it_says_so_and_shows_nothing(session, script, role):
    add_images(session, {"cats": 2}, status=ImageStatus.pending)
    at = ok(app(script, role))
    assert f"Your role ({role}) may not use this page." in at.warning[0].value
    assert not at.button and not at.title


def test_a_viewer_clicking_everything_it_sees_changes_nothing(trained):
    user("viewer user", "viewer")
    before = _snapshot()
    for script in ("dashboard.py", "pages/overview.py", "pages/metrics.py", "pages/models.py"):
        at = ok(app(script, "viewer"))
        assert not [b for b in at.button if not b.disabled and b.key != "sign_out"], script
        for button in at.button:
            if button.key != "sign_out":
                ok(button.click())
    at = ok(app("pages/models.py", "viewer"))
    assert any("Operators and admins promote" in c.value for c in at.caption)
    assert _snapshot() == before


def _snapshot() -> tuple:
    from core.models import AuditEvent, PromotionEvent

    with read_session() as reader:
        return (
            [(i.id, i.status, i.category_id) for i in reader.exec(select(TrainingImage))],
            [(v.version, v.is_production) for v in reader.exec(select(ModelVersion))],
            len(reader.exec(select(TrainingRound)).all()),
            len(reader.exec(select(PromotionEvent)).all()),
            len(reader.exec(select(AuditEvent)).all()),
        )


def test_overview_demo_button_is_disabled_for_a_viewer(session):
    at = ok(app("pages/overview.py", "viewer"))
    assert at.button[0].disabled
    assert not ok(app("pages/overview.py", "curator")).button[0].disabled


def test_models_page_offers_promotion_only_to_operators_and_admins(trained):
    trained.rollback()
    assert not ok(app("pages/models.py", "curator")).button  # download buttons are download_buttons
    keys = {b.key for b in ok(app("pages/models.py", "operator")).button}
    assert {"promote", "rollback"} <= keys


def test_admin_creates_a_user_who_can_sign_in_then_changes_role_resets_and_deactivates(session):
    from core import users

    at = ok(app("pages/admin.py", "admin", "root"))
    at.text_input(key="new_user_name").input("bea")
    at.selectbox(key="new_user_role").select("curator")
    ok(at.get("form_submit_button")[0].click())
    password = at.code[0].value  # st.code: shown with a copy button
    with session_scope() as s:
        assert users.sign_in("bea", password, session=s).role == "curator"

    at.selectbox(key="manage_user").select("bea")
    ok(at)
    at.selectbox(key="manage_role").select("operator")
    ok(at.button(key="change_role").click())
    assert "'bea' is now operator." in at.success[0].value
    ok(at.button(key="reset_password").click())
    new_password = at.code[0].value
    with session_scope() as s:
        assert not users.sign_in("bea", password, session=s).ok
        assert users.sign_in("bea", new_password, session=s).role == "operator"
    ok(at.button(key="toggle_active").click())
    assert "deactivated" in at.success[0].value
    with session_scope() as s:
        assert "deactivated" in users.sign_in("bea", new_password, session=s).message
    assert table(at, "last sign-in").set_index("name").loc["bea", "active"] == False  # noqa: E712


def test_admin_tables_show_dates_without_raw_timestamps_or_none(session):
    at = ok(app("pages/admin.py"))
    users_table = next(f for f in at.dataframe if "last sign-in" in f.value.columns)
    config = json.loads(users_table.proto.columns)
    assert config["created"]["type_config"]["format"] == "YYYY-MM-DD HH:mm", config
    assert "None" not in table(at, "last sign-in").astype(str).to_string()


def test_admin_creates_a_token_sees_its_secret_once_and_revokes_it(session):
    from core import tokens

    at = ok(app("pages/admin.py"))
    at.text_input(key="token_label").input("pixel of Ana")
    at.selectbox(key="token_role").select("device")
    at.number_input(key="token_days").set_value(30)
    ok(at.get("form_submit_button")[1].click())
    message = at.success[0].value
    secret = at.code[0].value
    assert secret.startswith("tdb_") and "not shown again" in message
    listed = table(at, "last used")
    assert listed[["label", "role", "state"]].values.tolist() == [["pixel of Ana", "device", "active"]]
    assert secret not in listed.to_string()
    with read_session() as reader:
        assert tokens.verify_token(secret, session=reader).label == "pixel of Ana"
    ok(at)  # the secret is shown once only
    assert not at.code

    ok(at.button(key="revoke").click())
    assert table(at, "last used")["state"].tolist() == ["revoked"]


def test_audit_page_filters_by_person_and_action(session):
    from core.access import Actor
    from core.review import set_status

    ids = add_images(session, {"cats": 3}, status=ImageStatus.pending)
    set_status(ids[:2], ImageStatus.validated, session=session, actor=Actor("ana", "curator"))
    add_category("dogs", session=session, actor=Actor("bo", "admin"))
    session.commit()
    at = ok(app("pages/audit.py", "operator"))
    assert table(at, "action")["action"].tolist() == ["user.create", "category.add", "image.validate", "image.validate"]
    ok(at.selectbox(key="audit_person").select("ana"))
    assert set(table(at, "action")["action"]) == {"image.validate"}
    ok(at.selectbox(key="audit_person").select("All"))
    ok(at.selectbox(key="audit_action").select("category.add"))
    assert table(at, "action")[["who", "target"]].values.tolist() == [["bo", "category:dogs"]]


def test_review_page_shows_the_history_of_an_image(session):
    ids = add_images(session, {"cats": 1}, status=ImageStatus.pending)
    at = ok(app("pages/review.py", "curator", "Ada"))
    ok(at.checkbox(key=f"pick_{ids[0]}").check())
    ok(at.button(key="validate").click())
    history = table(at, "before")
    assert history[["who", "action", "before", "after"]].values.tolist() == [
        ["Ada", "image.validate", "status: pending", "status: validated"]
    ]
