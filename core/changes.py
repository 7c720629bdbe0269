"""Change stamps: a counter per kind of row, bumped in the very transaction
that inserts, updates or deletes such rows, whoever does it (the dashboard,
the API, a worker, the command line: every write goes through a SQLAlchemy
session, whose events are hooked here).

A cache of answers derived from those rows (the API's manifest and the
status of finished jobs, api/cached.py) keeps the stamps it read before
computing each answer, and serves it only while one read of the stamps
(`read_stamps`) gives the same numbers: exact across processes and machines
sharing the database, with no time-to-live to tune.
"""

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from sqlalchemy import event, update
from sqlalchemy.orm import Session, UOWTransaction

from core.models import ApiToken, ChangeStamp, EpochMetric, ModelVersion, PromotionEvent, TestPrediction, TrainingRound

# What a change to each table invalidates.
KINDS = {
    ModelVersion.__tablename__: "models",
    PromotionEvent.__tablename__: "models",
    TestPrediction.__tablename__: "models",
    TrainingRound.__tablename__: "rounds",
    EpochMetric.__tablename__: "rounds",
    ApiToken.__tablename__: "tokens",
}

Stamps = dict[str, int]
# Not a kind: which database the stamps were read from (core.db.current_stamps),
# part of every cached answer's stamps.
DATABASE = "database"


_PENDING = "changes.pending_kinds"


def _note(session: Session, kinds: Iterable[str]) -> None:
    session.info.setdefault(_PENDING, set()).update(kinds)


def _kind(instance) -> str | None:
    return KINDS.get(getattr(instance, "__tablename__", None))


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _flush: UOWTransaction) -> None:
    _note(session, {_kind(obj) for obj in (*session.new, *session.dirty, *session.deleted)} - {None})


@event.listens_for(Session, "do_orm_execute")
def _bulk_statement(state) -> None:
    # `session.exec(update(TrainingRound)...)` flushes nothing: note it here.
    if (state.is_update or state.is_delete) and state.statement.table is not None:
        kind = KINDS.get(state.statement.table.name)
        if kind is not None:
            _note(state.session, [kind])


@event.listens_for(Session, "before_commit")
def _bump(session: Session) -> None:
    """Bump the noted kinds as the transaction's last statements. Taken
    earlier (at each flush), a stamp's row lock was held while the
    transaction went on to lock rows, and a heartbeat (its UPDATE noted
    before it ran) took the two in the other order: PostgreSQL found
    deadlocks between a job's progress and its own heartbeat. Last, and in
    sorted order, a stamp lock is only ever waited for by transactions that
    are committing, so it takes part in no cycle."""
    session.flush()
    kinds = session.info.pop(_PENDING, set())
    for kind in sorted(kinds):
        session.connection().execute(
            update(ChangeStamp).where(ChangeStamp.kind == kind).values(counter=ChangeStamp.counter + 1)
        )


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(_PENDING, None)


def read_stamps(dbapi_connection) -> Stamps:
    """Every kind's counter now (one small read), through a driver connection:
    SQLAlchemy's own layers would cost several times the query on the API's
    fastest path."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT kind, counter FROM changestamp")
        return dict(cursor.fetchall())
    finally:
        cursor.close()


class StampedCache:
    """Answers keyed by anything hashable, each kept with the stamps of the
    kinds it depends on; at most `size` of them, the least used dropped first."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[tuple[int, ...], object]] = OrderedDict()

    @staticmethod
    def _of(stamps: Stamps, kinds: tuple[str, ...]) -> tuple[int, ...] | None:
        # A kind without its row (a database not migrated here) is never bumped: nothing is cached then.
        if any(kind not in stamps for kind in kinds):
            return None
        return (stamps.get(DATABASE), *(stamps[kind] for kind in kinds))

    def get(self, key: Hashable, stamps: Stamps, kinds: tuple[str, ...]):
        """The answer stored under `key` if its kinds have not changed since, else None."""
        found = self._entries.get(key)
        now = self._of(stamps, kinds)
        if found is None or now is None or found[0] != now:
            return None
        self._entries.move_to_end(key)
        return found[1]

    def put(self, key: Hashable, stamps: Stamps, kinds: tuple[str, ...], value: object) -> None:
        """Keep `value`, computed after `stamps` were read."""
        now = self._of(stamps, kinds)
        if now is None:
            return
        self._entries[key] = (now, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
