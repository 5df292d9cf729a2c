"""Schema versions: every change is an Alembic migration under ``router_db/migrations/versions``.

:func:`upgrade` brings any router DB to this version's schema: a new one is created, one made before
migrations existed (by ``create_all``, identical to revision 0001) is adopted as 0001, and every later
revision is applied in order. ``python -m reconciler db upgrade`` runs it; so does the sidecar at start.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

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


ADVISORY_LOCK = 7_216_455_001  # PostgreSQL: replicas starting together migrate one after the other


def upgrade(engine: Engine) -> None:
    with _sqlite_file_lock(engine):
        _upgrade(engine)


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """SQLite: processes starting together on one file migrate one after the other (PostgreSQL
    serialises them with an advisory lock inside the migration's transaction)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _upgrade(engine: Engine) -> None:
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # SQLite migrations rebuild tables (DROP, then re-create): with foreign keys on, the drop
            # of ``jobs`` would cascade to every audit row. The pragma only takes effect outside a
            # transaction; the router DB turns it on again for every connection it opens.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if not sqlite:
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})
                config = _config(connection)
                tables = set(inspect(connection).get_table_names())
                if "jobs" in tables and "alembic_version" not in tables:
                    command.stamp(config, FIRST)  # created by create_all before migrations existed
                command.upgrade(config, "head")
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"router DB migration broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
