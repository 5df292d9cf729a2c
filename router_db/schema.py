"""Schema versions: every change is an Alembic migration under ``router_db/migrations/versions``.

:func:`upgrade` brings any router DB to this version's schema: a new one is created, one made before
migrations existed (by ``create_all``, identical to revision 0001) is adopted as 0001, and every later
revision is applied in order. ``python -m reconciler db upgrade`` runs it; so does the sidecar at start.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST = "0001"


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    revision = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the router DB is at; None for an empty database (or one from before migrations)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    with engine.begin() as connection:
        config = _config(connection)
        tables = set(inspect(connection).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            command.stamp(config, FIRST)  # created by create_all before migrations existed
        command.upgrade(config, "head")
