"""Look-alikes without chaining, re-keyed splits, test predictions in their own
table, and the gate's minimum of shared test images.

Data changes (README, "Upgrading to look-alike clusters"):
- every image gets the 256-bit hash (read from its file) and its cluster's
  representative (core/duplicates.py);
- an image whose split key the old rule had taken from another image (chained
  through near-duplicate hashes) gets its own again, or its new
  representative's; an image some version trained on or validated with never
  moves into the test set (it keeps its old key instead);
- each version's recorded test predictions move from `metrics` into
  `testprediction`, unchanged, and its metrics gain the counts behind its
  test accuracy (from the labels its round recorded).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import json

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "testprediction",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("predicted", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["modelversion.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version_id", "image_id"),
    )
    with op.batch_alter_table("testprediction", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_testprediction_image_id"), ["image_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_testprediction_version_id"), ["version_id"], unique=False)

    with op.batch_alter_table("trainingimage", schema=None) as batch_op:
        batch_op.alter_column(
            "phash",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=16),
            type_=sqlmodel.sql.sqltypes.AutoString(length=64),
            existing_nullable=True,
        )
        batch_op.add_column(sa.Column("representative_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_trainingimage_representative_id"), ["representative_id"], unique=False)

    with op.batch_alter_table("automation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gate_min_test_images", sa.Integer(), nullable=False, server_default="30"))

    connection = op.get_bind()
    _move_test_predictions(connection)
    _rekey_images(connection)


def _move_test_predictions(connection) -> None:
    from core.gate import test_summary

    rows = connection.execute(
        sa.text(
            "SELECT modelversion.id, modelversion.metrics, traininground.snapshot FROM modelversion "
            "LEFT JOIN traininground ON traininground.id = modelversion.round_id"
        )
    ).all()
    for version_id, metrics, snapshot in rows:
        metrics = json.loads(metrics) if isinstance(metrics, str) else dict(metrics)
        predicted = {int(k): v for k, v in (metrics.pop("test_predictions", None) or {}).items()}
        if not predicted:
            continue
        for image_id, label in predicted.items():
            connection.execute(
                sa.text("INSERT INTO testprediction (version_id, image_id, predicted) VALUES (:v, :i, :p)"),
                {"v": version_id, "i": image_id, "p": label},
            )
        snapshot = json.loads(snapshot) if isinstance(snapshot, str) else (snapshot or [])
        truth = {entry["id"]: entry["label"] for entry in snapshot if entry["id"] in predicted}
        metrics |= test_summary(predicted, truth)
        connection.execute(
            sa.text("UPDATE modelversion SET metrics = :m WHERE id = :v"), {"m": json.dumps(metrics), "v": version_id}
        )


def _rekey_images(connection) -> None:
    from core.config import get_settings
    from core.duplicates import file_fingerprint, group
    from core.splits import key_from_sha, split_of

    settings = get_settings()
    images = connection.execute(sa.text("SELECT id, sha256, path, split_key FROM trainingimage ORDER BY id")).all()
    if not images:
        return
    trained = set()
    for (snapshot,) in connection.execute(
        sa.text(
            "SELECT traininground.snapshot FROM traininground "
            "JOIN modelversion ON modelversion.round_id = traininground.id"
        )
    ):
        snapshot = json.loads(snapshot) if isinstance(snapshot, str) else (snapshot or [])
        trained |= {e["id"] for e in snapshot if e.get("split_key") is None or e["split_key"] >= settings.test_split}
    fingerprints = [file_fingerprint(settings.data_dir / path) for _, _, path, _ in images]
    hashes = [phash for phash, _ in fingerprints]
    representatives = group(fingerprints)
    keys: list[float | None] = []
    for position, (image_id, sha256, _, old) in enumerate(images):
        rep = representatives[position]
        if old is None:
            new = None  # given on the next assignment (core/splits.py)
        elif rep == position or keys[rep] is None:
            new = key_from_sha(sha256)  # what it had unless the old rule chained it
        else:
            new = keys[rep]
        moves_to_test = new is not None and split_of(new, 0.0, settings.test_split) == "test"
        if moves_to_test and image_id in trained and split_of(old, 0.0, settings.test_split) != "test":
            new = old  # a version learnt it: it must not become a test image
        keys.append(new)
        connection.execute(
            sa.text("UPDATE trainingimage SET phash = :h, representative_id = :r, split_key = :k WHERE id = :i"),
            {"h": hashes[position], "r": None if new is None else images[rep][0], "k": new, "i": image_id},
        )


def downgrade() -> None:
    connection = op.get_bind()
    predictions: dict[int, dict[str, str]] = {}
    for version_id, image_id, label in connection.execute(
        sa.text("SELECT version_id, image_id, predicted FROM testprediction")
    ):
        predictions.setdefault(version_id, {})[str(image_id)] = label
    for version_id, metrics in connection.execute(sa.text("SELECT id, metrics FROM modelversion")).all():
        if version_id in predictions:
            metrics = json.loads(metrics) if isinstance(metrics, str) else dict(metrics)
            metrics["test_predictions"] = predictions[version_id]
            connection.execute(
                sa.text("UPDATE modelversion SET metrics = :m WHERE id = :v"),
                {"m": json.dumps(metrics), "v": version_id},
            )
    # The 64-bit hashes are gone; the older code hashes images that have no split key.
    connection.execute(sa.text("UPDATE trainingimage SET phash = NULL"))

    with op.batch_alter_table("automation", schema=None) as batch_op:
        batch_op.drop_column("gate_min_test_images")

    with op.batch_alter_table("trainingimage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_trainingimage_representative_id"))
        batch_op.drop_column("representative_id")
        batch_op.alter_column(
            "phash",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=64),
            type_=sqlmodel.sql.sqltypes.AutoString(length=16),
            existing_nullable=True,
        )

    with op.batch_alter_table("testprediction", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_testprediction_version_id"))
        batch_op.drop_index(batch_op.f("ix_testprediction_image_id"))
    op.drop_table("testprediction")
