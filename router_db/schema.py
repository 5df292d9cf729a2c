"""Schema versions: every change is an Alembic migration under ``router_db/migrations/versions``.

:func:`upgrade` brings any router DB to this version's schema: a new one is created, one made before
migrations existed (by ``create_all``, identical to revision 0001) is adopted as 0001, and every later
revision is applied in order. ``python -m reconciler db upgrade`` runs it.

The sidecar does not migrate at start unless told to (``[router_db] upgrade_on_start``): a rollout
whose new replicas altered the tables under the old ones still serving would break those. It calls
:func:`prepare_for_start`, which creates an empty router DB, starts on one at this version's revision,
and refuses any other (:class:`SchemaRefused`): older, made before migrations, or newer than this code.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
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


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head() -> str:
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def known_revisions() -> frozenset[str]:
    """Every revision this code has a migration for."""
    return frozenset(script.revision for script in _scripts().walk_revisions())


def current(engine: Engine) -> str | None:
    """The revision the router DB is at; None for an empty database (or one from before migrations)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# --- what a router DB holds, and whether a sidecar may start on it -------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaState:
    """What a router DB holds: its revision (None without one) and whether it has the jobs table."""

    revision: str | None
    has_tables: bool


class Verdict(StrEnum):
    CURRENT = "current"  # at this version's revision: start
    EMPTY = "empty"  # no tables: created at this version's revision
    OLDER = "older"  # an earlier revision: `db upgrade` first
    UNVERSIONED = "unversioned"  # tables made before migrations existed: `db upgrade` first
    NEWER = "newer"  # a revision this code does not know: a newer release migrated it


def verdict(state: SchemaState, *, head: str, known: frozenset[str]) -> Verdict:
    """How a router DB in ``state`` stands to code whose latest revision is ``head``."""
    if state.revision is None:
        return Verdict.UNVERSIONED if state.has_tables else Verdict.EMPTY
    if state.revision == head:
        return Verdict.CURRENT
    return Verdict.OLDER if state.revision in known else Verdict.NEWER


class SchemaRefused(Exception):
    """The router DB is not at this version's revision and may not be migrated here and now.

    ``str()`` says what was found and what is needed; :meth:`line` adds what to do about it.
    """

    def __init__(self, state: SchemaState, needed: str, verdict: Verdict) -> None:
        self.state = state
        self.needed = needed
        self.verdict = verdict
        if verdict is Verdict.NEWER:
            found = (
                f"the router DB is at revision {state.revision}, which this version does not know"
                f" (it needs {needed}): this sidecar is older than its database"
            )
        elif verdict is Verdict.UNVERSIONED:
            found = (
                "the router DB has tables but no revision (made before migrations existed),"
                f" this version needs revision {needed}"
            )
        elif verdict is Verdict.EMPTY:
            found = f"the router DB has no tables yet, this version needs revision {needed}"
        else:
            found = f"the router DB is at revision {state.revision}, this version needs revision {needed}"
        super().__init__(found)

    def line(self, config_path: str) -> str:
        """The one line a command prints: what was found, what is needed, and the command that fixes it."""
        if self.verdict is Verdict.NEWER:
            return f"{self}; run the release that migrated it, or a newer one"
        return f"{self}; run: python -m reconciler db upgrade --config {config_path}"


def read_state(connection: Connection) -> SchemaState:
    tables = set(inspect(connection).get_table_names())
    revision = (
        MigrationContext.configure(connection).get_current_revision() if "alembic_version" in tables else None
    )
    return SchemaState(revision=revision, has_tables="jobs" in tables)


def state(engine: Engine) -> SchemaState:
    """What the router DB holds now (read only)."""
    with engine.connect() as connection:
        return read_state(connection)


def prepare_for_start(engine: Engine, *, upgrade_on_start: bool, may_create: bool = True) -> None:
    """Make a router DB usable by this version at start, or raise :class:`SchemaRefused`.

    At this version's revision: nothing to do (no lock, no DDL). Empty: created at this version's
    revision (``may_create``), under the migration lock; a replica starting beside it finds it created
    and goes on. Older or made before migrations: upgraded with ``upgrade_on_start``, refused otherwise.
    A revision this code does not know is always refused.
    """
    latest = head()
    if verdict(state(engine), head=latest, known=known_revisions()) is Verdict.CURRENT:
        return
    # Judged again under the lock: another replica may be creating it right now (SQLite shows its
    # tables before their revision is written) or have migrated it meanwhile.
    with _sqlite_file_lock(engine):
        found = state(engine)
        judged = verdict(found, head=latest, known=known_revisions())
        if judged is Verdict.CURRENT:
            return
        if judged is Verdict.NEWER or not (upgrade_on_start or (judged is Verdict.EMPTY and may_create)):
            raise SchemaRefused(found, latest, judged)
        _upgrade(engine, only_if_empty=not upgrade_on_start)


# --- migrating ------------------------------------------------------------------------------------------

ADVISORY_LOCK = 7_216_455_001  # PostgreSQL: replicas starting together migrate one after the other


def upgrade(engine: Engine) -> None:
    """Migrate the router DB to this version's revision (SchemaRefused: it is at a newer one)."""
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


def _upgrade(engine: Engine, *, only_if_empty: bool = False) -> None:
    """Migrate to head inside one transaction, holding the lock; ``only_if_empty``: a router DB found
    neither empty nor at head (once the lock is held) is refused, unchanged."""
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
                found = read_state(connection)
                latest = head()
                judged = verdict(found, head=latest, known=known_revisions())
                if judged is Verdict.NEWER or (
                    only_if_empty and judged not in (Verdict.EMPTY, Verdict.CURRENT)
                ):
                    raise SchemaRefused(found, latest, judged)
                config = _config(connection)
                if judged is Verdict.UNVERSIONED:
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
