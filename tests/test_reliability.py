"""Crashes, cancels and concurrent writers: nothing lost, nothing half-made."""

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlmodel import Session, select

from core.db import read_session
from core.models import EpochMetric, ModelVersion, RoundStatus, TrainingRound
from core.training.rounds import recover_stale_rounds, replace_queue_task, run_training_round, start_training
from jobs import cancel_training, submit_training
from tests.conftest import ROOT, wait_for
from tests.factories import add_demo, as_actor

FAST_RECOVERY = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TIMEOUT": "3"}


@pytest.fixture
def fast_recovery(monkeypatch):
    for key, value in FAST_RECOVERY.items():
        monkeypatch.setenv(key, value)
    from core.config import get_settings

    get_settings.cache_clear()


def get_round(round_id: int) -> TrainingRound:
    with read_session() as session:
        return session.get(TrainingRound, round_id)


def metrics_of(round_id: int) -> list[EpochMetric]:
    with read_session() as session:
        return list(
            session.exec(select(EpochMetric).where(EpochMetric.round_id == round_id).order_by(EpochMetric.epoch))
        )


def versions() -> list[ModelVersion]:
    with read_session() as session:
        return list(session.exec(select(ModelVersion)))


def model_files(data_dir) -> list[str]:
    folder = data_dir / "mobile_models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_killed_worker_resumes_from_checkpoint_not_from_epoch_1(
    data_dir, session, worker_factory, fast_recovery, ptl_only
):
    add_demo(session, per_category=20, size=64)
    round_ = submit_training({"epochs": 3, "batch_size": 8, "image_size": 96}, actor=as_actor("test"))
    first = worker_factory()
    wait_for(lambda: get_round(round_.id).current_epoch == 2, timeout=180, interval=0.05, message="epoch 2")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    killed = get_round(round_.id)
    assert killed.status == RoundStatus.in_progress
    original = metrics_of(round_.id)
    assert [m.epoch for m in original] == [1]
    assert (data_dir / "rounds" / killed.job_id / "checkpoint.pt").is_file()

    time.sleep(float(FAST_RECOVERY["HEARTBEAT_TIMEOUT"]) + 0.5)  # the heartbeat goes stale
    worker_factory()
    done = wait_for(
        lambda: (r := get_round(round_.id)).status in (RoundStatus.completed, RoundStatus.failed) and r,
        timeout=240,
        message="the resumed job to finish",
    )
    assert done.status == RoundStatus.completed, done.error
    assert done.attempts == 2
    assert any("worker lost during attempt 1" in line for line in done.history)
    assert any("resumed from the checkpoint of epoch 1, at epoch 2" in line for line in done.history)
    after = metrics_of(round_.id)
    assert [m.epoch for m in after] == [1, 2, 3]
    assert (after[0].id, after[0].created_at, after[0].val_accuracy) == (
        original[0].id,
        original[0].created_at,
        original[0].val_accuracy,
    )
    assert [v.version for v in versions()] == ["1.0.0"]
    assert model_files(data_dir) == ["model_1.0.0.ptl"]
    assert not (data_dir / "rounds" / done.job_id).exists()


def test_worker_killed_between_artifacts_and_commit_leaves_no_orphans_or_duplicates(
    data_dir, session, worker_factory, fast_recovery, ptl_only
):
    add_demo(session, per_category=10, size=32)
    round_ = submit_training({"epochs": 1, "batch_size": 16, "image_size": 32}, actor=as_actor("test"))
    crashing = worker_factory(CRASH_AT="before_commit")
    crashing.proc.wait(timeout=240)
    assert crashing.proc.returncode == -signal.SIGKILL
    assert model_files(data_dir) == ["model_1.0.0.ptl"]  # written, never committed
    assert versions() == []

    time.sleep(float(FAST_RECOVERY["HEARTBEAT_TIMEOUT"]) + 0.5)
    worker_factory()
    done = wait_for(
        lambda: (r := get_round(round_.id)).status == RoundStatus.completed and r, timeout=240, message="completion"
    )
    assert done.attempts == 2
    assert [v.version for v in versions()] == ["1.0.0"]
    assert model_files(data_dir) == ["model_1.0.0.ptl"]
    assert sorted(p.name for p in (data_dir / "checkpoints").iterdir()) == ["model_1.0.0.pt"]


def test_a_version_whose_worker_died_before_its_pte_gets_it_from_the_next_worker(
    data_dir, session, worker_factory, fast_recovery
):
    add_demo(session, per_category=10, size=32)
    round_ = submit_training({"epochs": 1, "batch_size": 16, "image_size": 32}, actor=as_actor("test"))
    crashing = worker_factory(CRASH_AT="after_commit")  # committed with its .ptl, then the machine went away
    crashing.proc.wait(timeout=240)
    assert crashing.proc.returncode == -signal.SIGKILL
    [version] = versions()
    assert [a["format"] for a in version.artifacts] == ["ptl"]  # downloadable meanwhile, without the .pte
    assert get_round(round_.id).status == RoundStatus.completed

    time.sleep(float(FAST_RECOVERY["HEARTBEAT_TIMEOUT"]) + 0.5)
    worker = worker_factory()
    wait_for(
        lambda: "model 1.0.0: .pte verified and added" in get_round(round_.id).history[-1],
        timeout=240,
        message="the .pte added by recovery",
    )
    [version] = versions()
    pte = next(a for a in version.artifacts if a["format"] == "pte")
    assert pte["parity"]["passed"] and pte["parity"]["images"] > 0
    assert model_files(data_dir) == ["model_1.0.0.pte", "model_1.0.0.ptl"]
    history = get_round(round_.id).history
    time.sleep(2 * float(FAST_RECOVERY["HEARTBEAT_TIMEOUT"]))  # later recoveries leave it alone
    assert get_round(round_.id).history == history and len(versions()[0].artifacts) == 2
    worker.stop()
    assert "adding it now" in worker.output()


def test_lost_job_without_attempts_left_is_failed_with_the_reason(data_dir, session, fast_recovery, monkeypatch):
    from core.models import utcnow

    add_demo(session, per_category=10, size=32)
    round_ = start_training({"epochs": 1}, session=session)
    round_.status, round_.attempts = RoundStatus.in_progress, 3
    round_.heartbeat_at = utcnow().replace(year=2000)
    session.add(round_)
    session.commit()
    assert recover_stale_rounds(session=session) == []
    session.commit()
    failed = get_round(round_.id)
    assert failed.status == RoundStatus.failed
    assert "worker lost during attempt 3" in failed.error and "no attempts left" in failed.error


def test_cancel_queued_job_never_starts(data_dir, session, worker_factory):
    add_demo(session, per_category=10, size=32)
    round_ = submit_training({"epochs": 1, "image_size": 32}, actor=as_actor("test"))
    assert cancel_training(round_.job_id, actor=as_actor("ana")).status == RoundStatus.cancelled
    worker = worker_factory()
    time.sleep(3)  # the worker had every chance to pick it up
    worker.stop()
    cancelled = get_round(round_.id)
    assert (cancelled.status, cancelled.attempts, cancelled.started_at) == (RoundStatus.cancelled, 0, None)
    assert any("cancelled by ana before it started" in line for line in cancelled.history)
    assert versions() == []


def test_cancel_running_job_stops_within_a_batch_and_leaves_nothing(data_dir, session, worker_factory):
    add_demo(session, per_category=20, size=64)
    round_ = submit_training({"epochs": 20, "batch_size": 8, "image_size": 96}, actor=as_actor("test"))
    worker_factory()
    wait_for(lambda: get_round(round_.id).current_batch >= 1, timeout=120, interval=0.05, message="training to start")
    asked = time.monotonic()
    assert cancel_training(round_.job_id, actor=as_actor("ana")).status == RoundStatus.in_progress
    done = wait_for(lambda: (r := get_round(round_.id)).status == RoundStatus.cancelled and r, timeout=60)
    # A batch of 8 images at 96 px takes well under a second here; allow for polling.
    assert time.monotonic() - asked < 5
    assert len(metrics_of(round_.id)) < 20
    assert versions() == [] and model_files(data_dir) == []
    assert not (data_dir / "rounds" / done.job_id).exists()


def test_cancel_of_finished_or_unknown_job_is_a_clear_error(data_dir, session):
    from core.errors import ConflictError, NotFoundError

    with pytest.raises(NotFoundError, match="No training job with id 'nope'"):
        cancel_training("nope", actor=as_actor())
    add_demo(session, per_category=10, size=32)
    round_ = submit_training({"epochs": 1}, actor=as_actor("test"))
    cancel_training(round_.job_id, actor=as_actor())
    with pytest.raises(ConflictError, match="already cancelled"):
        cancel_training(round_.job_id, actor=as_actor())


def test_two_jobs_finishing_at_once_get_distinct_versions(data_dir, session, monkeypatch, ptl_only):
    """A job that loses the race for a version number renames its files."""
    from core import registry
    from core.training import register

    add_demo(session, per_category=10, size=32)
    round_ = start_training({"epochs": 1, "image_size": 32, "batch_size": 16}, session=session)
    session.commit()
    real_export = register.export_model

    def export_while_another_job_commits(model, version, images, on_step=None, formats=None):
        artifacts = real_export(model, version, images, formats=formats)
        with Session(session.get_bind()) as other:  # the other job commits 1.0.0 first
            other.add(
                ModelVersion(
                    version=version, major=1, minor=0, patch=0, classes=["x"], architecture="resnet18",
                    image_size=32, checkpoint_path="checkpoints/other.pt",
                )
            )  # fmt: skip
            other.commit()
        return artifacts

    monkeypatch.setattr(register, "export_model", export_while_another_job_commits)
    version = run_training_round(round_.id, session=session)
    assert version.version == "2.0.0"  # the other model has another class list
    assert sorted(v.version for v in registry.list_versions(session=session)) == ["1.0.0", "2.0.0"]
    assert model_files(data_dir) == ["model_2.0.0.ptl"]
    assert all(a["path"].endswith(f"model_2.0.0.{a['format']}") for a in version.artifacts)


# --- several processes writing at once ----------------------------------------


def _writer(kind: str, worker: int, count: int, data_dir: str, round_id: int, image_ids: list[int]) -> None:
    os.environ["DATA_DIR"] = data_dir
    from core import review
    from core.db import session_scope
    from core.ingest import ingest_bytes
    from core.models import EpochMetric, TrainingRound, utcnow
    from tests.factories import image_bytes

    for i in range(count):
        with session_scope() as s:
            if kind == "upload":
                data = image_bytes(colour=(worker * 40 % 256, i % 256, (i * 7) % 256), size=(8, 8 + worker))
                assert ingest_bytes(data, f"{worker}-{i}.png", session=s, category="cat").outcome == "stored"
            elif kind == "review":
                review.set_status(
                    [image_ids[i % len(image_ids)]],
                    "validated" if i % 2 else "rejected",
                    session=s,
                    actor=as_actor(f"r{worker}"),
                )
            elif kind == "metrics":
                s.add(EpochMetric(round_id=round_id, epoch=worker * 1000 + i, train_loss=1, train_accuracy=1,
                                  val_loss=1, val_accuracy=1, learning_rate=0.1, seconds=0.1))  # fmt: skip
            else:
                r = s.get(TrainingRound, round_id)
                r.progress, r.heartbeat_at, r.current_batch = i / count, utcnow(), i
                r.history = [*r.history, f"status {worker}-{i}"]
                s.add(r)


def test_several_processes_writing_at_once_lose_nothing(data_dir, session):
    from tests.factories import add_images

    image_ids = add_images(session, {"dog": 10})
    round_ = TrainingRound(parameters={}, snapshot=[])
    session.add(round_)
    session.commit()
    count = 40
    plan = [("upload", 1), ("upload", 2), ("review", 3), ("metrics", 4), ("metrics", 5), ("status", 6)]
    # Separate interpreters (not multiprocessing: after AppTest has run a page
    # as __main__, spawned children would re-run that page).
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"from tests.test_reliability import _writer; _writer(*{args!r})"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in [(kind, w, count, str(data_dir), round_.id, image_ids) for kind, w in plan]
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(plan), f"a writer failed: {errors}"
    assert not any("database is locked" in e for e in errors)
    session.expire_all()
    from core.models import TrainingImage

    assert len(session.exec(select(TrainingImage)).all()) == 10 + 2 * count
    assert len(metrics_of(round_.id)) == 2 * count
    status_lines = [line for line in get_round(round_.id).history if line.startswith("status")]
    assert len(status_lines) == count


# --- the round is the record: queued rounds the queue does not hold ----------


@pytest.fixture
def no_grace(monkeypatch):
    """Queued rounds count as missing from the queue at once (HEARTBEAT_TIMEOUT is the grace)."""
    monkeypatch.setenv("HEARTBEAT_TIMEOUT", "0.2")
    from core.config import get_settings

    get_settings.cache_clear()


def test_train_call_with_an_unwritable_queue_records_the_round_and_the_sweep_enqueues_it_once(
    data_dir, session, monkeypatch, no_grace
):
    import sqlite3

    import jobs
    from jobs.queue import queued_task_ids

    add_demo(session, per_category=10, size=32)

    def unwritable(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    with monkeypatch.context() as broken:
        broken.setattr(jobs.huey.storage, "enqueue", unwritable)
        round_ = submit_training({"epochs": 1, "image_size": 32}, actor=as_actor("test"))
    assert get_round(round_.id).status == RoundStatus.queued and queued_task_ids() == set()
    time.sleep(0.3)
    assert jobs.enqueue_missing_rounds() == [round_.id]
    assert jobs.enqueue_missing_rounds() == []  # once: the queue holds it now
    assert queued_task_ids() == {get_round(round_.id).queue_task_id}


def test_two_sweeps_at_once_give_a_lost_round_one_task(data_dir, session):
    add_demo(session, per_category=10, size=32)
    round_ = start_training({"epochs": 1, "image_size": 32}, session=session)
    round_.queue_task_id = "lost"
    session.commit()
    assert replace_queue_task(round_.id, "lost", "first", session=session)
    assert not replace_queue_task(round_.id, "lost", "second", session=session)
    session.commit()
    # The task the sweep replaced does nothing if it turns up after all.
    assert run_training_round(round_.id, session=session, task_id="lost") is None
    again = get_round(round_.id)
    assert (again.status, again.attempts, again.queue_task_id) == (RoundStatus.queued, 0, "first")


def test_a_round_whose_queue_was_lost_runs_once_when_a_worker_starts(
    data_dir, session, worker_factory, no_grace, ptl_only
):
    add_demo(session, per_category=10, size=32)
    round_ = submit_training({"epochs": 1, "image_size": 32}, actor=as_actor("test"))
    # queue.db deleted (a disk replaced, a volume not mounted): its task is gone.
    for path in data_dir.glob("queue.db*"):
        path.unlink()
    from jobs.queue import bind_storage

    bind_storage()
    worker = worker_factory(HEARTBEAT_TIMEOUT="3", HEARTBEAT_INTERVAL="0.5")
    done = wait_for(
        lambda: get_round(round_.id).status in {RoundStatus.completed, RoundStatus.failed} and get_round(round_.id),
        timeout=240,
        message="the lost round to run",
    )
    assert (done.status, done.attempts) == (RoundStatus.completed, 1), done.history
    assert worker.output().count("was queued but missing from the queue") == 1
    assert len(versions()) == 1


def test_server_killed_mid_upload_leaves_files_that_the_worker_sweeps_after_the_grace(
    data_dir, session, tmp_path, worker_factory
):
    import httpx

    from core.models import TrainingImage
    from tests.factories import add_images, add_token, distinct_images
    from tests.servers import start_api

    add_images(session, {"cat": 1})
    kept = session.exec(select(TrainingImage)).one()
    kept_file = data_dir / kept.path
    headers = add_token(session, "device")
    server = start_api(data_dir, tmp_path / "api.log", CRASH_AT="ingest.file_written")
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(distinct_images(5))]
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{server.url}/images/", data={"category": "cat"}, files=files, headers=headers)
    assert server.proc.wait(timeout=30) == -signal.SIGKILL
    session.expire_all()
    assert session.exec(select(TrainingImage)).all() == [kept]  # the upload's rows never committed
    session.rollback()  # a session holds SQLite's write lock until its transaction ends
    orphans = [p for p in (data_dir / "images").rglob("*") if p.is_file() and p != kept_file]
    assert len(orphans) == 1
    old = time.time() - 3600
    os.utime(orphans[0], (old, old))
    young = orphans[0].with_name("f" * 64 + ".png")  # as if an upload were writing it right now
    young.write_bytes(b"in progress")
    worker = worker_factory()
    swept = f"removed {orphans[0]}: no image refers to it"
    wait_for(lambda: swept in worker.output(), timeout=120, message="the worker to sweep the orphan")
    assert not orphans[0].exists() and kept_file.exists() and young.exists()
