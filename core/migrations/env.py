"""Alembic environment: migrations run on the connection `core.db` hands over."""

from alembic import context
from sqlmodel import SQLModel

from core import models  # noqa: F401  (registers the tables)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite can only ALTER a table by copying it; "batch" mode does that.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
