"""Change stamps (core/changes.py): bumped in the transaction that changes the rows, whatever the way."""

from sqlmodel import update

from core.changes import StampedCache
from core.db import current_stamps
from core.models import EpochMetric, TrainingRound
from tests.factories import add_fake_version, add_token


def test_stamps_move_with_the_rows_they_watch_and_not_on_a_rollback(session):
    start = current_stamps()
    assert set(start) == {"models", "rounds", "tokens", "database"}
    session.add(TrainingRound())
    session.commit()
    assert current_stamps()["rounds"] > start["rounds"]
    before = current_stamps()
    session.exec(update(TrainingRound).values(attempts=3))  # a bulk statement flushes nothing
    session.commit()
    assert current_stamps()["rounds"] > before["rounds"]
    before = current_stamps()
    session.add(EpochMetric(round_id=1, epoch=1, train_loss=1, train_accuracy=1, val_loss=1, val_accuracy=1,
                            learning_rate=0.1, seconds=1))  # fmt: skip
    session.flush()
    session.rollback()
    assert current_stamps() == before
    add_fake_version(session, "1.0.0")
    add_token(session, "viewer")
    after = current_stamps()
    assert after["models"] > before["models"] and after["tokens"] > before["tokens"]


def test_a_cached_answer_lasts_while_its_kinds_do_not_change():
    cache = StampedCache(size=2)
    cache.put("a", {"models": 1, "rounds": 5}, ("models",), "answer")
    assert cache.get("a", {"models": 1, "rounds": 6}, ("models",)) == "answer"
    assert cache.get("a", {"models": 2, "rounds": 6}, ("models",)) is None
    # Another database with the same counters (a test's, or one the process was pointed at) is not this one.
    assert cache.get("a", {"database": 7, "models": 1}, ("models",)) is None
    cache.put("b", {}, ("models",), "never kept")  # a database without the stamps: nothing is cached
    assert cache.get("b", {}, ("models",)) is None
    cache.put("b", {"models": 1}, ("models",), "b")
    cache.put("c", {"models": 1}, ("models",), "c")
    assert cache.get("a", {"models": 1}, ("models",)) is None  # the least used went first
