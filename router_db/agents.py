"""Registered agents in the router DB: each one's latest heartbeat, one row per agent id.

A heartbeat is one statement, an upsert that returns the row as stored, in autocommit: at 1,000 agents
heartbeating every 10 s the sidecar writes ~100 of them a second, so each costs one round trip. The upsert
(``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING``, on PostgreSQL and SQLite alike) also makes
two replicas registering one id at once safe: the database serialises them on the primary key, never an
IntegrityError. Its ``WHERE`` is the conflict rule, so a refused heartbeat changes nothing.

The rule, for a row that exists: the same process (instance) with the same identity fingerprint beats
on; another process at the row's URL is that agent restarted there; another process at another URL
takes the id from a holder long silent with no active job, or moves the registration when the caller
has judged the move proven against this very row (``moving_from``: its URL and instance, and the same
non-empty fingerprint).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from router_db.clock import db_now
from router_db.models import Agent, Job
from router_db.records import AgentConflict, AgentRecord
from sidecar_api.protocol import ACTIVE

AGENTS = cast(Table, Agent.__table__)
ATTEMPTS = 3  # a conflicting row deleted between the upsert and its read: try again


class Agents:
    """Heartbeats, the list of registered agents, and forgetting the long silent ones."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._upsert = _upsert(insert)
        self._upsert_now = _upsert(insert, db_clock=engine.dialect.name)

    def heartbeat(
        self, record: AgentRecord, *, alive_after: datetime, moving_from: tuple[str, str] | None = None
    ) -> AgentRecord:
        """Insert the agent's row or update all of it; the row as stored.

        ``registered_at`` is kept while the instance is the same (a heartbeat), and is the record's for a
        new instance (a registration). An existing row at another URL, of another instance, that heartbeat
        at or after ``alive_after`` is another live agent under this id: AgentConflict, nothing changed;
        unless ``moving_from`` is that row's ``(url, instance)`` and its identity fingerprint is the
        record's (a move the caller has proven: see :mod:`reconciler.registry`). The same instance with
        another fingerprint is refused too.
        """
        record.check()
        params = {f"new_{name}": value for name, value in _values(record).items()}
        params["alive_after"] = _utc(alive_after)
        return self._beat(self._upsert, record, params, moving_from)

    def heartbeat_now(
        self, record: AgentRecord, *, alive_within: float, moving_from: tuple[str, str] | None = None
    ) -> AgentRecord:
        """:meth:`heartbeat` at the router DB's clock: the heartbeat's time, and a new instance's
        ``registered_at``, are the database's now (the record's are not used), and ``alive_after`` is
        ``alive_within`` seconds before it. The replica that heard the heartbeat reads no clock of its
        own: the replica that judges it compares with the same database's."""
        record.check()
        clocked = ("registered_at", "last_heartbeat_at")
        params: dict[str, Any] = {f"new_{k}": v for k, v in _values(record).items() if k not in clocked}
        params["alive_within"] = float(alive_within)
        return self._beat(self._upsert_now, record, params, moving_from)

    def _beat(
        self,
        upsert: Any,
        record: AgentRecord,
        params: dict[str, Any],
        moving_from: tuple[str, str] | None,
    ) -> AgentRecord:
        # NULL matches no row: without a judged move, the statement allows none.
        params["from_url"], params["from_instance"] = moving_from or (None, None)
        # Autocommit: the upsert is its own transaction, one round trip, no BEGIN and COMMIT around it.
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for _ in range(ATTEMPTS):
                stored = connection.execute(upsert, params).one_or_none()
                if stored is not None:
                    return AgentRecord.from_row(stored)
                # Refused, by the database, atomically; the holder is read for the message only.
                held = select(AGENTS).where(AGENTS.c.agent_id == record.agent_id)
                holder = connection.execute(held).one_or_none()
                if holder is not None:
                    raise AgentConflict(AgentRecord.from_row(holder))
                # forget() deleted it in between: try again.
        raise RuntimeError(f"agent {record.agent_id!r}: heartbeat neither stored nor refused")

    def get(self, agent_id: str) -> AgentRecord | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(AGENTS).where(AGENTS.c.agent_id == agent_id)).one_or_none()
            return AgentRecord.from_row(row) if row is not None else None

    def live_at(self, url: str, *, other_than: str, alive_within: float) -> AgentRecord | None:
        """Another agent registered at ``url`` whose last heartbeat is less than ``alive_within``
        seconds old by the router DB's clock, if any."""
        c = AGENTS.c
        recent = c.last_heartbeat_at >= db_now(self._engine.dialect.name, -float(alive_within))
        query = select(AGENTS).where(c.url == url, c.agent_id != other_than, recent).limit(1)
        with self._engine.connect() as connection:
            row = connection.execute(query).one_or_none()
            return AgentRecord.from_row(row) if row is not None else None

    def all(self) -> list[AgentRecord]:
        with self._engine.connect() as connection:
            rows = connection.execute(select(AGENTS).order_by(AGENTS.c.agent_id))
            return [AgentRecord.from_row(row) for row in rows]

    def leave(self, agent_id: str, instance: str) -> bool:
        """The agent process ``instance`` stops for good: its row goes unless it has an active job (then
        it stays, and the lost rule ends those jobs if it never comes back). Whether it went."""
        c = AGENTS.c
        busy = exists().where(Job.agent_id == c.agent_id, Job.status.in_([str(s) for s in ACTIVE]))
        with self._engine.begin() as connection:
            gone = connection.execute(
                delete(AGENTS).where(c.agent_id == agent_id, c.instance == instance, ~busy)
            )
            return bool(gone.rowcount)

    def forget(self, *, silent_before: datetime) -> list[str]:
        """Delete agents whose last heartbeat is older than ``silent_before`` and that have no active job
        (queued, running or stopping); the ids deleted. A heartbeat committed meanwhile keeps its agent:
        the condition is the DELETE's own."""
        c = AGENTS.c
        busy = exists().where(Job.agent_id == c.agent_id, Job.status.in_([str(s) for s in ACTIVE]))
        silent: ColumnElement[bool] = c.last_heartbeat_at < _utc(silent_before)
        with self._engine.begin() as connection:
            gone = connection.execute(delete(AGENTS).where(silent, ~busy).returning(c.agent_id))
            return sorted(gone.scalars())


def _upsert(insert: Callable[[Table], Any], *, db_clock: str | None = None) -> Any:
    """The heartbeat's statement, built once (bound parameters ``new_<column>`` and ``alive_after``):
    a heartbeat only binds values to it. With ``db_clock`` (the dialect), its times are the router
    DB's now, and ``alive_after`` is that now less the bound ``alive_within`` seconds."""
    c = AGENTS.c
    values: dict[str, Any] = {col.name: bindparam(f"new_{col.name}", type_=col.type) for col in c}
    alive_after: Any = bindparam("alive_after", type_=c.last_heartbeat_at.type)
    if db_clock is not None:
        values["registered_at"] = values["last_heartbeat_at"] = db_now(db_clock)
        alive_after = db_now(db_clock, -bindparam("alive_within", type_=Float()))
    upsert = insert(AGENTS).values(values)
    new = upsert.excluded
    # SET and WHERE read the existing row; ``excluded`` is the one proposed.
    updates: dict[str, Any] = {col.name: new[col.name] for col in c if col.name != "agent_id"}
    updates["registered_at"] = case((c.instance == new.instance, c.registered_at), else_=new.registered_at)
    # Another agent (another URL and instance) takes the id only from one long silent that holds no
    # active job: while it does, its jobs would be addressed to the newcomer, which knows none of them
    # (a stop there would find nothing and the job would run on). A lost agent's jobs end FAILED, so a
    # dead holder frees its id once the sidecar has declared it lost.
    busy = exists().where(Job.agent_id == c.agent_id, Job.status.in_([str(s) for s in ACTIVE]))
    fingerprint = c.identity_fingerprint
    from_url = bindparam("from_url", type_=String())
    from_instance = bindparam("from_instance", type_=String())
    allowed = or_(
        # The same process: its identity cannot change while it runs (another is an impostor); a row
        # written without one (by a replica older than identities) takes the one it proves.
        and_(c.instance == new.instance, or_(fingerprint == new.identity_fingerprint, fingerprint == "")),
        # Another process at the row's address: the agent restarted there (the call-back checked who
        # answers there), proving the row's identity, or none (judged as before identities). Another
        # identity there is a new agent, its predecessor's jobs unknown to it: the last clause's.
        and_(
            c.url == new.url,
            c.instance != new.instance,
            or_(fingerprint == "", new.identity_fingerprint == "", fingerprint == new.identity_fingerprint),
        ),
        # The agent's own identity at a new address, judged against this very row: a move.
        and_(
            c.url == from_url,
            c.instance == from_instance,
            fingerprint != "",
            fingerprint == new.identity_fingerprint,
        ),
        and_(c.last_heartbeat_at < alive_after, ~busy),
    )
    return upsert.on_conflict_do_update(index_elements=[c.agent_id], set_=updates, where=allowed).returning(
        *c
    )


def _values(record: AgentRecord) -> dict[str, Any]:
    return {
        "agent_id": record.agent_id,
        "url": record.url,
        "labels": json.dumps(list(record.labels)),
        "max_jobs": record.max_jobs,
        "jobs_running": record.jobs_running,
        "version": record.version,
        "draining": record.draining,
        "instance": record.instance,
        "registered_at": _utc(record.registered_at),
        "last_heartbeat_at": _utc(record.last_heartbeat_at),
        "heartbeat_seconds": float(record.heartbeat_seconds),
        "identity_fingerprint": record.identity_fingerprint,
    }


def _utc(moment: datetime) -> datetime:
    """SQLite keeps a datetime's wall time without its offset: every one stored or compared is UTC."""
    if moment.tzinfo is None:
        raise ValueError("the router DB needs UTC-aware datetimes")
    return moment.astimezone(UTC)
