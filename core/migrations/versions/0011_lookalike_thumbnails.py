"""Look-alike thumbnails: the second check that confirms a hash match.

Data changes: none at upgrade. Images stored before get their thumbnail from
their file the first time the look-alike check needs it (core/duplicates.py,
`stored_thumbs`); existing clusters and split keys stay as they are, so no
image moves between training, validation and test.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lookalikethumb",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("pixels", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["trainingimage.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id"),
    )


def downgrade() -> None:
    op.drop_table("lookalikethumb")
