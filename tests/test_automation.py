"""Automatic retraining: the triggers' settings, the check and the periodic task."""

import itertools
import threading
from datetime import UTC, datetime, timedelta

import pytest
from huey.api import PeriodicTask
from sqlmodel import Session, select

from core import automation
from core.automation import check_triggers, update_automation
from core.db import get_engine, read_session
from core.errors import PermissionDeniedError, UserError
from core.ingest import ingest_bytes
from core.models import AuditEvent, Automation, ImageStatus, RoundStatus, TrainingRound
from jobs.queue import cancel_training, check_automatic_training, huey, run_automatic_check
from tests.conftest import _clear_caches, wait_for
from tests.factories import add_demo, as_actor, image_bytes
from tests.servers import start_postgres

OPERATOR = as_actor("olga", "operator")
# Automatic jobs in these tests: as small as training gets.
TINY = {"epochs": 1, "batch_size": 8, "image_size": 32, "use_existing_model": False}
_colours = itertools.count(1)


@pytest.fixture(autouse=True)
def small_rules(data_dir, monkeypatch):
    """Training needs 4 validated images here, not 50."""
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "4")
    _clear_caches()


def add_validated(session: Session, n: int, status=ImageStatus.validated) -> None:
    """`n` new distinct images, alternating between two categories."""
    for i in range(n):
        c = next(_colours)
        data = image_bytes((c % 256, c // 256 % 256, 77), size=(16, 16))
        ingest_bytes(data, "x.png", session=session, category=("cats", "dogs")[i % 2], status=status)
    session.commit()


def configure(session: Session, **changes) -> None:
    update_automation(changes, session=session, actor=OPERATOR)
    session.commit()


def saved() -> Automation | None:
    with read_session() as reader:
        return reader.get(Automation, automation.AUTOMATION_ID)


def automatic_rounds() -> list[TrainingRound]:
    with read_session() as reader:
        query = select(TrainingRound).where(TrainingRound.trigger.is_not(None)).order_by(TrainingRound.id)
        return list(reader.exec(query))


def finish(session: Session, round_: TrainingRound, status: RoundStatus) -> None:
    """Stand in for the worker: the round ended (no training needed here)."""
    row = session.get(TrainingRound, round_.id)
    row.status = status
    session.add(row)
    session.commit()


# --- the new-images trigger ----------------------------------------------------


def test_new_images_trigger_fires_once_per_threshold_crossing(session):
    configure(session, new_images_enabled=True, new_images_threshold=6, parameters=TINY)
    add_validated(session, 5)
    add_validated(session, 3, status=ImageStatus.pending)  # not validated: not counted
    assert run_automatic_check() is None
    assert saved().last_check_result == "waiting: 5 of 6 new validated images"

    add_validated(session, 1)
    first = run_automatic_check()
    assert first is not None
    assert (first.trigger, first.requested_by, first.status) == ("new_images", "auto", RoundStatus.queued)
    assert first.total_images == 6 and first.parameters["epochs"] == 1 and first.queue_task_id
    assert huey.pending_count() == 1
    assert saved().last_check_result.startswith("started by 6 new validated images (threshold 6)")

    # The automatic job is still queued: checking again starts nothing.
    add_validated(session, 6)
    assert run_automatic_check() is None
    assert "an automatic job is already queued" in saved().last_check_result
    finish(session, first, RoundStatus.in_progress)
    assert run_automatic_check() is None
    assert "already running" in saved().last_check_result

    # Once it finished, the 6 images added meanwhile are new since its snapshot.
    finish(session, first, RoundStatus.completed)
    second = run_automatic_check()
    assert second is not None and second.total_images == 12
    finish(session, second, RoundStatus.completed)
    assert run_automatic_check() is None
    assert saved().last_check_result == "waiting: 0 of 6 new validated images"
    add_validated(session, 5)
    assert run_automatic_check() is None
    add_validated(session, 1)
    assert run_automatic_check() is not None

    assert len(automatic_rounds()) == 3 and huey.pending_count() == 3
    with read_session() as reader:
        starts = reader.exec(select(AuditEvent).where(AuditEvent.action == "training.start")).all()
    assert [(e.actor, e.after["trigger"]) for e in starts] == [("auto", "new_images")] * 3


def test_a_failed_automatic_round_does_not_fire_again_on_the_same_images(session):
    configure(session, new_images_enabled=True, new_images_threshold=4)
    add_validated(session, 4)
    round_ = run_automatic_check()
    finish(session, round_, RoundStatus.failed)
    with read_session() as reader:
        assert automation.new_images_since_last_round(session=reader) == 0
    assert run_automatic_check() is None
    assert len(automatic_rounds()) == 1


@pytest.fixture(scope="module")
def postgres_url():
    try:
        server = start_postgres()
    except (FileNotFoundError, KeyError) as exc:
        pytest.skip(f"needs a real PostgreSQL: {exc}")
    yield server.url
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, data_dir, monkeypatch) -> Session:
    """A session on SQLite (the default) and on PostgreSQL where it is installed."""
    if request.param == "postgresql":
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("postgres_url"))
        _clear_caches()
    with Session(get_engine(), expire_on_commit=False) as session:
        yield session


def test_two_checks_at_once_never_queue_two_automatic_jobs(any_database):
    session = any_database
    configure(session, new_images_enabled=True, new_images_threshold=4)
    add_validated(session, 4)
    start = threading.Barrier(4)
    results, errors = [], []

    def check() -> None:
        start.wait()
        try:
            results.append(run_automatic_check())
        except Exception as exc:  # reported below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sum(r is not None for r in results) == 1
    assert len(automatic_rounds()) == 1 and huey.pending_count() == 1


def test_nothing_fires_when_the_dataset_breaks_the_training_rules(session):
    configure(session, new_images_enabled=True, new_images_threshold=3, schedule_enabled=True)
    add_validated(session, 3)
    assert run_automatic_check() is None
    result = saved().last_check_result
    assert "but training cannot start: Training needs at least 4 validated images; there are 3" in result
    # The schedule stays due: it fires as soon as the data allows.
    assert saved().last_scheduled_at is None


# --- the schedule --------------------------------------------------------------


def test_schedule_fires_when_due_and_records_last_scheduled_at(session):
    configure(session, schedule_enabled=True, schedule_hours=24)
    add_validated(session, 4)
    start = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

    decision = check_triggers(session=session, now=start)
    session.commit()
    assert decision.trigger == "schedule" and "never ran" in decision.reason
    assert saved().last_scheduled_at.replace(tzinfo=UTC) == start

    early = check_triggers(session=session, now=start + timedelta(hours=23, minutes=59))
    session.commit()
    assert early.trigger is None
    assert early.reason == "waiting: next scheduled run at 2026-11-27 09:00 UTC"
    assert saved().last_scheduled_at.replace(tzinfo=UTC) == start

    # Both due: the schedule goes first (its round takes the new images along).
    configure(session, new_images_enabled=True, new_images_threshold=4)
    due = check_triggers(session=session, now=start + timedelta(hours=24))
    session.commit()
    assert due.trigger == "schedule" and "4 new validated images" in due.reason
    assert saved().last_scheduled_at.replace(tzinfo=UTC) == start + timedelta(hours=24)
    with read_session() as reader:
        shown = automation.state(session=reader, now=start + timedelta(hours=25))
    assert shown.schedule_text == "on, every 24 h: next scheduled run at 2026-11-28 09:00 UTC"
    assert shown.new_images_text == "on: 4 of 4 new validated images"


def test_state_says_when_the_next_check_runs_and_warns_when_checks_stopped(session):
    now = datetime(2026, 11, 26, 9, 0, 30, tzinfo=UTC)
    with read_session() as reader:
        fresh = automation.state(session=reader, now=now)
    assert fresh.new_images_text == "off (0 of 100 new validated images)" and fresh.last_check_text == "never"
    assert fresh.warning is None
    configure(session, new_images_enabled=True, new_images_threshold=100)
    check_triggers(session=session, now=now)
    session.commit()
    with read_session() as reader:
        shown = automation.state(session=reader, now=now + timedelta(seconds=95))
        late = automation.state(session=reader, now=now + timedelta(minutes=10))
    assert shown.next_check_at == now + timedelta(minutes=2)
    assert shown.last_check_text == "2026-11-26 09:00:30 UTC: waiting: 0 of 100 new validated images"
    assert shown.warning is None
    assert "worker" in late.warning


# --- settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"new_images_threshold": 0}, "new_images_threshold must be between 1 and 1,000,000 (got 0)"),
        ({"new_images_threshold": 2.5}, "new_images_threshold must be a whole number between 1 and 1,000,000"),
        ({"new_images_threshold": "100"}, "new_images_threshold must be a whole number between 1 and 1,000,000"),
        ({"schedule_hours": 0.1}, "schedule_hours must be between 0.25 and 720 (got 0.1)"),
        ({"schedule_hours": float("nan")}, "schedule_hours must be between 0.25 and 720"),
        ({"gate_min_improvement": 101}, "gate_min_improvement must be between 0 and 100 (got 101)"),
        ({"gate_max_category_drop": -1}, "gate_max_category_drop must be between 0 and 100 (got -1)"),
        ({"schedule_enabled": "yes"}, "schedule_enabled must be true or false"),
        ({"parameters": {"epochs": 0}}, "epochs must be between 1 and 500 (got 0)"),
        ({"parameters": {"colour": "red"}}, "Unknown parameter(s) colour"),
        ({"threshold": 5}, "Unknown automation setting(s) threshold"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message_and_change_nothing(session, bad, message):
    with pytest.raises(UserError) as refused:
        update_automation({"new_images_enabled": True, **bad}, session=session, actor=OPERATOR)
    assert message in str(refused.value)
    session.rollback()
    assert saved() is None
    assert session.exec(select(AuditEvent)).all() == []


def test_only_operators_and_admins_change_the_settings(session):
    with pytest.raises(PermissionDeniedError):
        update_automation({"new_images_enabled": True}, session=session, actor=as_actor("cora", "curator"))


def test_a_change_is_saved_with_who_and_audited_with_before_and_after(session):
    configure(session, new_images_enabled=True, new_images_threshold=250, parameters={"epochs": 3, "seed": None})
    configure(session, gate_min_improvement=2.5)
    row = saved()
    assert (row.new_images_enabled, row.new_images_threshold, row.gate_min_improvement) == (True, 250, 2.5)
    assert row.parameters == {"epochs": 3} and row.updated_by == "olga" and row.updated_at is not None
    events = session.exec(select(AuditEvent).where(AuditEvent.action == "automation.update")).all()
    assert [(e.actor, e.target) for e in events] == [("olga", "automation")] * 2
    assert events[0].before == {"new_images_enabled": False, "new_images_threshold": 100, "parameters": {}}
    assert events[1].before == {"gate_min_improvement": 1.0} and events[1].after == {"gate_min_improvement": 2.5}


# --- the queue -----------------------------------------------------------------


def test_the_check_is_a_periodic_task_every_minute():
    assert isinstance(check_automatic_training.s(), PeriodicTask)
    for minute in (0, 1, 17, 59):
        due = huey.read_periodic(datetime(2026, 11, 26, 9, minute))
        assert [task.name for task in due] == ["check_automatic_training"]


def test_a_real_consumer_runs_the_automatic_job_and_its_periodic_check(session, worker_factory):
    # Long enough (many small batches) to be caught running; cancelled then, as
    # the whole pipeline (export included) is test_pipeline_e2e's subject.
    long = {**TINY, "epochs": 50, "batch_size": 2}
    configure(session, new_images_enabled=True, new_images_threshold=20, parameters=long)
    # Drawn pictures, not flat colours, like every training test.
    add_demo(session, per_category=4, size=32)
    queued = run_automatic_check()
    # A consumer enqueues its periodic tasks as it starts, then every minute;
    # with one worker that check runs after the job and finds nothing new.
    worker = worker_factory()

    def status(*wanted: RoundStatus) -> TrainingRound | None:
        with read_session() as reader:
            row = reader.get(TrainingRound, queued.id)
            return row if row.status in wanted and row.current_batch > 0 else None

    running = wait_for(lambda: status(RoundStatus.in_progress), timeout=120, message="the automatic job to train")
    assert running.attempts == 1 and running.trigger == "new_images"
    cancel_training(queued.job_id, actor=OPERATOR)
    ended = wait_for(
        lambda: status(RoundStatus.cancelled, RoundStatus.failed, RoundStatus.completed), message="the job to stop"
    )
    assert ended.status == RoundStatus.cancelled, worker.output()[-3000:]
    wait_for(lambda: saved().last_check_result.startswith("waiting"), timeout=90, message="the periodic check")
    assert saved().last_check_result == "waiting: 0 of 20 new validated images"
    assert len(automatic_rounds()) == 1


# --- the command line ----------------------------------------------------------


def test_cli_shows_and_changes_the_settings_as_cli(session, capsys):
    from cli import main

    assert main(["automation", "--new-images", "40", "--schedule-hours", "12", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "Automatic retraining updated." in out and "New images: on: 0 of 40 new validated images" in out
    assert "Schedule: on, every 12 h: due now" in out and "Automatic jobs train with: epochs 3" in out
    assert main(["automation", "--no-schedule", "--image-size", "64", "--min-improvement", "2"]) == 0
    row = saved()
    assert (row.new_images_enabled, row.schedule_enabled, row.gate_min_improvement) == (True, False, 2.0)
    assert row.parameters == {"epochs": 3, "image_size": 64} and row.updated_by == "cli"

    assert main(["automation", "--off", "--new-images", "5"]) == 2
    assert main(["automation", "--schedule-hours", "0"]) == 2
    assert "schedule_hours must be between 0.25 and 720 (got 0.0)" in capsys.readouterr().err
    assert main(["automation", "--off", "--default-parameters"]) == 0
    row = saved()
    assert (row.new_images_enabled, row.schedule_enabled, row.parameters) == (False, False, {})
