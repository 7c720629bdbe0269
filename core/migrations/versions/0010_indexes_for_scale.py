"""Indexes for 200,000 images: counts per category and status, the dataset
per upload day, look-alike groups, open suspects by score, rollbacks; and
the change stamps the API's caches check (core/changes.py).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_trainingimage_category_status", "trainingimage", ["category_id", "status"]),
    ("ix_trainingimage_day_category_status", "trainingimage", ["uploaded_at", "category_id", "status"]),
    ("ix_trainingimage_representative_status", "trainingimage", ["representative_id", "status"]),
    ("ix_suspectscore_resolution_score", "suspectscore", ["resolution", "score"]),
    ("ix_promotionevent_to_version", "promotionevent", ["to_version"]),
)


# core.changes.KINDS, as of this revision.
KINDS = ("models", "rounds", "tokens")


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    stamps = op.create_table(
        "changestamp",
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("counter", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind"),
    )
    op.bulk_insert(stamps, [{"kind": kind, "counter": 0} for kind in KINDS])


def downgrade() -> None:
    op.drop_table("changestamp")
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
