"""The same code on PostgreSQL and Redis: two consumers share one queue."""

import signal
import time

import pytest
from sqlmodel import select

from core.db import read_session
from core.models import EpochMetric, ModelVersion, RoundStatus, TrainingRound
from tests.conftest import wait_for
from tests.factories import add_demo, as_actor
from tests.servers import start_postgres, start_redis


@pytest.fixture(scope="module")
def servers():
    started = []
    try:
        started.append(start_postgres())
        started.append(start_redis())
    except (FileNotFoundError, KeyError) as exc:
        for server in started:
            server.stop()
        pytest.skip(f"needs real PostgreSQL and Redis: {exc}")
    yield {"database": started[0].url, "queue": started[1].url}
    for server in started:
        server.stop()


@pytest.fixture
def scaled_out(servers, data_dir, monkeypatch):
    """DATABASE_URL and QUEUE_URL point at the servers (fresh schema each test)."""
    import psycopg

    with psycopg.connect(servers["database"], autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    import redis

    redis.Redis.from_url(servers["queue"]).flushdb()
    env = {
        "DATABASE_URL": servers["database"],
        "QUEUE_URL": servers["queue"],
        "HEARTBEAT_INTERVAL": "0.5",
        "HEARTBEAT_TIMEOUT": "3",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from tests.conftest import _clear_caches

    _clear_caches()
    yield env
    _clear_caches(bind_queue=False)


def rounds() -> list[TrainingRound]:
    with read_session() as session:
        return list(session.exec(select(TrainingRound).order_by(TrainingRound.id)))


def test_two_consumers_run_each_job_once_and_one_takes_over_a_killed_ones_job(scaled_out, worker_factory, ptl_only):
    from core.db import session_scope
    from jobs import submit_training

    with session_scope() as session:
        assert session.get_bind().dialect.name == "postgresql"
        add_demo(session, per_category=12, size=32)
    tiny = {"batch_size": 8, "image_size": 32}
    long_job = submit_training({**tiny, "epochs": 4, "image_size": 48}, actor=as_actor("test"))
    first = worker_factory()
    wait_for(lambda: rounds()[0].current_epoch >= 2, timeout=180, interval=0.05, message="the first job's epoch 2")
    second = worker_factory()
    for _ in range(3):
        submit_training({**tiny, "epochs": 1}, actor=as_actor("test"))
    first.proc.send_signal(signal.SIGKILL)  # a machine goes away mid-job
    first.proc.wait()

    def all_done():
        current = rounds()
        return all(r.status in (RoundStatus.completed, RoundStatus.failed) for r in current) and current

    done = wait_for(all_done, timeout=600, interval=0.5, message="all jobs to finish on the second consumer")
    assert [r.status for r in done] == [RoundStatus.completed] * 4, [r.error for r in done]
    killed, others = done[0], done[1:]
    assert killed.id == long_job.id and killed.attempts == 2, "\n".join(killed.history)
    assert any("worker lost during attempt 1" in line for line in killed.history)
    assert any("resumed from the checkpoint" in line for line in killed.history)
    assert [r.attempts for r in others] == [1, 1, 1]  # each ran exactly once
    with read_session() as session:
        for r in done:
            epochs = [m.epoch for m in session.exec(select(EpochMetric).where(EpochMetric.round_id == r.id))]
            assert sorted(epochs) == list(range(1, r.parameters["epochs"] + 1))
        versions = sorted(v.version for v in session.exec(select(ModelVersion)))
    assert versions == ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]
    time.sleep(0.1)
    second.stop()


def test_a_jobs_progress_and_its_heartbeat_never_deadlock_on_the_change_stamps(scaled_out):
    """A worker's main thread writes the round's progress (an ORM flush) while
    its heartbeat thread stamps the same row (a bulk UPDATE). Each also bumps
    the 'rounds' change stamp; taken in opposite orders, PostgreSQL found a
    deadlock and failed the job (seen in CI)."""
    import threading

    from sqlmodel import Session, update

    from core.db import get_engine, session_scope
    from core.models import utcnow

    with session_scope() as session:
        session.add(TrainingRound())
    engine = get_engine()
    progress = Session(engine)
    round_ = progress.get(TrainingRound, 1)
    # The round's row is locked (an UPDATE the stamps' hooks do not see) ...
    progress.connection().execute(update(TrainingRound.__table__).where(TrainingRound.id == 1).values(total_batches=9))
    errors = []

    def heartbeat():
        try:
            with Session(engine) as beat:
                beat.exec(update(TrainingRound).where(TrainingRound.id == 1).values(heartbeat_at=utcnow()))
                beat.commit()
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=heartbeat)
    thread.start()
    time.sleep(0.5)  # ... so the heartbeat waits for it
    round_.current_batch = 3
    progress.commit()  # an ORM flush, then the commit
    thread.join(timeout=30)
    progress.close()
    assert not thread.is_alive() and errors == []
    with read_session() as session:
        assert session.get(TrainingRound, 1).current_batch == 3
