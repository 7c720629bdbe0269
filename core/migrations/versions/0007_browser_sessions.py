"""Browser sessions: the signed-in dashboard survives reloads and new tabs.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "browsersession",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("ticket_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("token_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["appuser.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("browsersession", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_browsersession_user_id"), ["user_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_browsersession_ticket_hash"), ["ticket_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_browsersession_token_hash"), ["token_hash"], unique=True)


def downgrade() -> None:
    op.drop_table("browsersession")
