"""Federated rounds: which phones fetched a plan's head (pending by name).

Data changes: none (one new table).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federatedfetch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("device", sqlmodel.AutoString(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["plan_id"], ["federatedplan.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("plan_id", "token_id"),
    )
    op.create_index(op.f("ix_federatedfetch_plan_id"), "federatedfetch", ["plan_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_federatedfetch_plan_id"), table_name="federatedfetch")
    op.drop_table("federatedfetch")
