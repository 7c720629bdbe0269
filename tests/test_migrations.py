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


def test_upgrade_rekeys_images_the_old_rule_chained_and_keeps_recorded_predictions(data_dir):
    import json
    import random

    from bench import datasets
    from core import gate
    from core.models import ModelVersion
    from core.splits import key_from_sha, split_of

    path = data_dir / "data.db"
    old = create_engine(f"sqlite:///{path}")
    with old.begin() as connection:
        command.upgrade(alembic_config(connection), "0004")
    old.dispose()
    letters, _ = datasets.glyphs(3, seed=5)
    (data_dir / "images").mkdir()
    files = {
        "a": datasets.png(letters[0]),
        "b": datasets.png(letters[1]),  # a different picture the old rule chained to a
        "c": datasets.copy_bytes(letters[0], "jpeg", random.Random(0)),  # a genuine copy of a
        "d": datasets.png(letters[2]),  # a different picture, chained, that version 1.0.0 trained on
    }
    # a is a test image (its own key 0.05); b and c took its key; d took a training key.
    shas = {"a": "0d" + "0" * 62, "b": "8" + "0" * 63, "c": "c" + "0" * 63, "d": "01" + "0" * 62}
    keys = {"a": key_from_sha(shas["a"]), "d": 0.9}
    keys["b"] = keys["c"] = keys["a"]
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO category (id, name, created_at) VALUES (1, 'letter', '2026-01-01 00:00:00')")
        for n, name in enumerate("abcd", start=1):
            (data_dir / "images" / f"{name}.img").write_bytes(files[name])
            db.execute(
                "INSERT INTO trainingimage (id, sha256, path, original_filename, category_id, status, source, width,"
                " height, size_bytes, uploaded_at, phash, split_key) VALUES (?, ?, ?, '', 1, 'validated', 'mobile',"
                " 64, 64, 1, '2026-01-01 00:00:00', 'ffffffffffffffff', ?)",
                (n, shas[name], f"images/{name}.img", keys[name]),
            )
        snapshot = [
            {"id": n, "sha256": shas[k], "label": "letter", "split_key": keys[k]} for n, k in enumerate("abcd", 1)
        ]
        db.execute(
            "INSERT INTO traininground (id, job_id, parameters, status, attempts, created_at, cancel_requested,"
            " snapshot, snapshot_hash, total_images, category_distribution, classes, warnings, history,"
            " current_epoch, current_batch, total_batches, progress) VALUES (1, 'j', '{}', 'completed', 1,"
            " '2026-01-01 00:00:00', 0, ?, '', 4, '{}', '[]', '[]', '[]', 0, 0, 0, 1.0)",
            (json.dumps(snapshot),),
        )
        metrics = {
            "test_accuracy": 66.67,
            "test_images": 3,
            "test_predictions": {"1": "letter", "2": "x", "3": "letter"},
        }
        db.execute(
            "INSERT INTO modelversion (id, version, major, minor, patch, round_id, classes, architecture, image_size,"
            " checkpoint_path, metrics, artifacts, is_production, created_at) VALUES (1, '1.0.0', 1, 0, 0, 1,"
            " '[\"letter\", \"x\"]', 'mobilenet_v3_small', 32, 'c.pt', ?, '[]', 1, '2026-01-01 00:00:00')",
            (json.dumps(metrics),),
        )

    get_engine()  # upgrades to the newest revision
    with read_session() as session:
        images = {img.sha256: img for img in session.exec(select(TrainingImage))}
        a, b, c, d = (images[shas[k]] for k in "abcd")
        assert len(a.phash) == 64 and a.representative_id == a.id and a.split_key == keys["a"]
        assert c.representative_id == a.id and c.split_key == a.split_key  # the copy stays with a
        assert b.representative_id == b.id and b.split_key == key_from_sha(shas["b"])  # its own key back
        # d's own key is a test key, but version 1.0.0 trained on it: it keeps its old one.
        assert split_of(key_from_sha(shas["d"]), 0.2) == "test" and d.split_key == 0.9
        version = session.exec(select(ModelVersion)).one()
        assert "test_predictions" not in version.metrics
        assert gate.test_predictions(version, session=session) == {1: "letter", 2: "x", 3: "letter"}
        assert (version.metrics["test_correct"], version.metrics["test_majority"]) == (2, 3)
