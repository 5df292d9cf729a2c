"""Alembic's entry point: migrates over the connection :mod:`router_db.schema` hands in."""

from __future__ import annotations

from alembic import context

from router_db.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
