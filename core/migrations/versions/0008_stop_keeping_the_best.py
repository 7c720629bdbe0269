"""A running job can be stopped keeping its best epoch so far, and records its phases.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite has it): a batch operation would copy and drop
    # the table, which versions and epoch rows point at.
    op.add_column("traininground", sa.Column("stop_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("traininground", sa.Column("phases", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("traininground", schema=None) as batch_op:
        batch_op.drop_column("phases")
        batch_op.drop_column("stop_requested")
