"""Federated rounds: the plans phones fetch and the updates they send.

Data changes: none (two new tables).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federatedplan",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sqlmodel.AutoString(), nullable=False),
        sa.Column("deadline_at", sa.DateTime(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("head_path", sqlmodel.AutoString(), nullable=False),
        sa.Column("clients", sa.Integer(), nullable=False),
        sa.Column("test_accuracy", sa.Float(), nullable=True),
        sa.Column("test_images", sa.Integer(), nullable=False),
        sa.Column("error", sqlmodel.AutoString(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["round_id"], ["traininground.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("round_id", "number"),
    )
    op.create_index("ix_federatedplan_round_id", "federatedplan", ["round_id"])
    op.create_index("ix_federatedplan_status", "federatedplan", ["status"])
    op.create_table(
        "federatedupdate",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("device", sqlmodel.AutoString(), nullable=False),
        sa.Column("accepted_token_id", sa.Integer(), nullable=True),
        sa.Column("status", sqlmodel.AutoString(), nullable=False),
        sa.Column("reason", sqlmodel.AutoString(), nullable=True),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=True),
        sa.Column("update_norm", sa.Float(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["plan_id"], ["federatedplan.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("plan_id", "accepted_token_id"),
    )
    op.create_index("ix_federatedupdate_plan_id", "federatedupdate", ["plan_id"])
    op.create_index("ix_federatedupdate_token_id", "federatedupdate", ["token_id"])
    op.create_index("ix_federatedupdate_status", "federatedupdate", ["status"])


def downgrade() -> None:
    op.drop_table("federatedupdate")
    op.drop_table("federatedplan")
