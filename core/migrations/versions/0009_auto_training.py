"""Auto training mode: the search's trials, and the parameters as the operator asked.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, as in 0008: a batch copy would drop the table others point at.
    op.add_column("traininground", sa.Column("requested_parameters", sa.JSON(), nullable=False, server_default="{}"))
    op.add_column("traininground", sa.Column("trials", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("traininground", schema=None) as batch_op:
        batch_op.drop_column("trials")
        batch_op.drop_column("requested_parameters")
