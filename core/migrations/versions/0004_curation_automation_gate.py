"""Curation (near-duplicate hashes, fixed splits, suspected mislabels),
automatic retraining, the promotion gate, and where a round trained.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "automation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("new_images_enabled", sa.Boolean(), nullable=False),
        sa.Column("new_images_threshold", sa.Integer(), nullable=False),
        sa.Column("schedule_enabled", sa.Boolean(), nullable=False),
        sa.Column("schedule_hours", sa.Float(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("gate_min_improvement", sa.Float(), nullable=False),
        sa.Column("gate_max_category_drop", sa.Float(), nullable=False),
        sa.Column("last_check_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_check_result", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("last_scheduled_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("updated_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "suspectscore",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("given_label", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("suggested_label", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("given_probability", sa.Float(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("scored_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("resolution", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("resolved_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("resolved_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["trainingimage.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("suspectscore", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_suspectscore_image_id"), ["image_id"], unique=True)
        batch_op.create_index(batch_op.f("ix_suspectscore_resolution"), ["resolution"], unique=False)
        batch_op.create_index(batch_op.f("ix_suspectscore_score"), ["score"], unique=False)

    with op.batch_alter_table("modelversion", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gate", sa.JSON(), nullable=True))

    with op.batch_alter_table("promotionevent", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("override", sa.Boolean(), nullable=False, server_default=sa.false()))

    with op.batch_alter_table("trainingimage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phash", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(sa.Column("split_key", sa.Float(), nullable=True))
        batch_op.create_index(batch_op.f("ix_trainingimage_phash"), ["phash"], unique=False)
        batch_op.create_index(batch_op.f("ix_trainingimage_split_key"), ["split_key"], unique=False)

    with op.batch_alter_table("traininground", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trigger", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("device", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.create_index(batch_op.f("ix_traininground_trigger"), ["trigger"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("traininground", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_traininground_trigger"))
        batch_op.drop_column("device")
        batch_op.drop_column("trigger")

    with op.batch_alter_table("trainingimage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_trainingimage_split_key"))
        batch_op.drop_index(batch_op.f("ix_trainingimage_phash"))
        batch_op.drop_column("split_key")
        batch_op.drop_column("phash")

    with op.batch_alter_table("promotionevent", schema=None) as batch_op:
        batch_op.drop_column("override")
        batch_op.drop_column("reason")

    with op.batch_alter_table("modelversion", schema=None) as batch_op:
        batch_op.drop_column("gate")

    with op.batch_alter_table("suspectscore", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_suspectscore_score"))
        batch_op.drop_index(batch_op.f("ix_suspectscore_resolution"))
        batch_op.drop_index(batch_op.f("ix_suspectscore_image_id"))

    op.drop_table("suspectscore")
    op.drop_table("automation")
