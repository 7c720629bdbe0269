"""Schema changes are Alembic migrations; old databases upgrade with their data."""

import sqlite3

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel, select

from core.db import MIGRATIONS, get_engine, read_session
from core.models import Category, TrainingImage


def alembic_config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def test_migrations_build_exactly_the_tables_the_code_declares(data_dir):
    engine = get_engine()
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == [], f"models and migrations differ; add a migration: {diff}"


def test_database_made_by_the_first_migration_upgrades_with_its_data(data_dir):
    path = data_dir / "data.db"
    old = create_engine(f"sqlite:///{path}")
    with old.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")
    assert "apitoken" not in inspect(old).get_table_names()
    with sqlite3.connect(path) as db:  # data written by the previous release
        db.execute("INSERT INTO category (id, name, created_at) VALUES (1, 'cat', '2026-01-01 00:00:00')")
        db.execute(
            "INSERT INTO trainingimage (id, sha256, path, original_filename, category_id, status, source,"
            " width, height, size_bytes, uploaded_at) VALUES (7, 'ab', 'images/ab.png', 'a.png', 1,"
            " 'validated', 'mobile', 32, 24, 100, '2026-01-01 00:00:00')"
        )
    old.dispose()

    get_engine()  # what every process does on start
    with read_session() as session:
        image = session.exec(select(TrainingImage)).one()
        assert (image.id, image.sha256, image.width, image.status.value) == (7, "ab", 32, "validated")
        assert session.exec(select(Category)).one().name == "cat"
    tables = set(inspect(get_engine()).get_table_names())
    assert {"apitoken", "alembic_version"} <= tables


def test_database_from_before_migrations_is_adopted_and_upgraded(data_dir):
    path = data_dir / "data.db"
    old = create_engine(f"sqlite:///{path}")
    later = {"apitoken", "appuser", "auditevent", "signinthrottle", "suspectscore", "automation"}
    with old.begin() as connection:  # how the first release made it: 0001's tables, no revision stamp
        command.upgrade(alembic_config(connection), "0001")
        connection.exec_driver_sql("DROP TABLE alembic_version")
    with old.begin() as connection:
        connection.exec_driver_sql("INSERT INTO category (name, created_at) VALUES ('dog', '2026-01-01 00:00:00')")
    old.dispose()
    get_engine()
    with read_session() as session:
        assert [c.name for c in session.exec(select(Category))] == ["dog"]
    assert later <= set(inspect(get_engine()).get_table_names())
