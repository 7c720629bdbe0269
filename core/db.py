"""Engines and sessions. One engine per URL per process."""

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from core import changes, models  # noqa: F401  (registers the tables and the change stamps' session hooks)
from core.config import get_settings


def make_engine(url: str, readonly: bool = False) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    busy_ms = get_settings().sqlite_busy_timeout_ms

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy's BEGIN reach SQLite so we can use BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # Writers take the write lock up front: a deferred transaction that
        # reads and then writes fails with "database is locked" at once (no
        # busy wait) when another process committed in between. Readers
        # (`read_session`) stay deferred so they never block anyone.
        connection.exec_driver_sql("BEGIN DEFERRED" if readonly else "BEGIN IMMEDIATE")

    return engine


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (default: the configured database), tables created."""
    return _engine(url or get_settings().db_url, readonly=False)


@lru_cache
def _engine(url: str, readonly: bool) -> Engine:
    if readonly:
        _engine(url, readonly=False)  # creates the tables
        return make_engine(url, readonly=True)
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    init_db(engine)
    return engine


MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def init_db(engine: Engine) -> None:
    """Bring the schema to the newest migration (Alembic), on SQLite or PostgreSQL.

    Every process calls this on start; concurrent callers are serialised by the
    database (SQLite's write lock, a PostgreSQL advisory lock)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727384)")
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "category" in tables and "alembic_version" not in tables:
            # Made by create_all before migrations existed: adopt it at the
            # revision its tables match, then upgrade as usual.
            command.stamp(config, "0002" if "apitoken" in tables else "0001")
        command.upgrade(config, "head")


def read_engine(url: str | None = None) -> Engine:
    """The same database for read-only work: transactions take no write lock."""
    return _engine(url or get_settings().db_url, readonly=True)


def current_stamps(url: str | None = None) -> changes.Stamps:
    """The change stamps now (core/changes.py): one small read, no write lock.
    With them, which database they are of (`changes.DATABASE`): two databases
    can have the same counters, and a process may be pointed at another one
    (the tests do, one per test)."""
    url = url or get_settings().db_url
    connection = read_engine(url).raw_connection()
    try:
        return {**changes.read_stamps(connection), changes.DATABASE: _database_id(url)}
    finally:
        # Back to the pool, which ends the (read-only) transaction PostgreSQL opened.
        connection.close()


@lru_cache
def _database_id(url: str) -> int:
    return int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big")


def clear_engines() -> None:
    """Forget cached engines (tests point DATA_DIR elsewhere)."""
    _engine.cache_clear()


@contextmanager
def read_session(url: str | None = None) -> Iterator[Session]:
    """A session for reading (pages, GET routes, polling). Do not write with it."""
    with Session(read_engine(url), expire_on_commit=False) as session:
        yield session


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session for one unit of work, committed on success."""
    with Session(get_engine(url), expire_on_commit=False) as session:
        yield session
        session.commit()
