"""The first release's schema (before API tokens).

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "category",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("category", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_category_name"), ["name"], unique=True)

    op.create_table(
        "trainingimage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("path", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("original_filename", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("category_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.Enum("pending", "validated", "rejected", name="imagestatus"), nullable=False),
        sa.Column("source", sa.Enum("upload", "mobile", "import_", name="imagesource"), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("uploaded_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("uploaded_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("reviewed_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("reviewed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["category_id"],
            ["category.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("trainingimage", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_trainingimage_category_id"), ["category_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_trainingimage_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_trainingimage_sha256"), ["sha256"], unique=True)
        batch_op.create_index(batch_op.f("ix_trainingimage_source"), ["source"], unique=False)
        batch_op.create_index(batch_op.f("ix_trainingimage_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_trainingimage_uploaded_at"), ["uploaded_at"], unique=False)

    op.create_table(
        "traininground",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("queued", "in_progress", "completed", "failed", "cancelled", name="roundstatus"),
            nullable=False,
        ),
        sa.Column("queue_task_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("requested_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("heartbeat_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("snapshot", sa.JSON(), nullable=False),
        sa.Column("snapshot_hash", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("total_images", sa.Integer(), nullable=False),
        sa.Column("category_distribution", sa.JSON(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("current_epoch", sa.Integer(), nullable=False),
        sa.Column("current_batch", sa.Integer(), nullable=False),
        sa.Column("total_batches", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("traininground", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_traininground_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_traininground_job_id"), ["job_id"], unique=True)
        batch_op.create_index(batch_op.f("ix_traininground_status"), ["status"], unique=False)

    op.create_table(
        "epochmetric",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=False),
        sa.Column("train_accuracy", sa.Float(), nullable=False),
        sa.Column("val_loss", sa.Float(), nullable=False),
        sa.Column("val_accuracy", sa.Float(), nullable=False),
        sa.Column("learning_rate", sa.Float(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["traininground.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("round_id", "epoch"),
    )
    with op.batch_alter_table("epochmetric", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_epochmetric_round_id"), ["round_id"], unique=False)

    op.create_table(
        "modelversion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("major", sa.Integer(), nullable=False),
        sa.Column("minor", sa.Integer(), nullable=False),
        sa.Column("patch", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("architecture", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("image_size", sa.Integer(), nullable=False),
        sa.Column("checkpoint_path", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("artifacts", sa.JSON(), nullable=False),
        sa.Column("is_production", sa.Boolean(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("promoted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["traininground.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("major", "minor", "patch"),
    )
    with op.batch_alter_table("modelversion", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_modelversion_is_production"), ["is_production"], unique=False)
        batch_op.create_index(batch_op.f("ix_modelversion_version"), ["version"], unique=True)

    op.create_table(
        "promotionevent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("from_version", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("to_version", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )

    # traininground and modelversion refer to each other: add the second link last.
    with op.batch_alter_table("traininground", schema=None) as batch_op:
        batch_op.create_foreign_key("fk_traininground_model_version_id", "modelversion", ["model_version_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("traininground", schema=None) as batch_op:
        batch_op.drop_constraint("fk_traininground_model_version_id", type_="foreignkey")
    for table in ("promotionevent", "modelversion", "epochmetric", "traininground", "trainingimage", "category"):
        op.drop_table(table)
    for enum in ("roundstatus", "imagestatus", "imagesource"):
        sa.Enum(name=enum).drop(op.get_bind(), checkfirst=True)
