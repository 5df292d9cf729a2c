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
non-empty fingerprint). That is the upsert of a registration made with the fleet token (a bootstrap).

A heartbeat made with the agent's own credential (its identity proof, whose fingerprint the row holds)
is an UPDATE of that row alone, never an insert: it beats, restarts at the row's URL or moves as judged,
and may renew the credential (the row's fingerprint becomes the new one, the old is kept as
``previous_fingerprint`` so that a renewal whose answer was lost is presented again, not locked out).
A revoked row takes neither: it stays, refusing its id, until an operator forgets it.
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
    func,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from router_db.clock import db_now
from router_db.models import Agent, JobRow
from router_db.records import AgentConflict, AgentRecord, NotRegistered
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
        self._update_now = _credential_update(engine.dialect.name)
        self._dialect = engine.dialect.name

    def heartbeat(
        self, record: AgentRecord, *, alive_after: datetime, moving_from: tuple[str, str] | None = None
    ) -> AgentRecord:
        """Insert the agent's row or update all of it; the row as stored.

        ``registered_at`` is kept while the instance is the same (a heartbeat), and is the record's for a
        new instance (a registration). An existing row at another URL, of another instance, that heartbeat
        at or after ``alive_after`` is another live agent under this id: AgentConflict, nothing changed;
        unless ``moving_from`` is that row's ``(url, instance)`` and its identity fingerprint is the
        record's (a move the caller has proven: see :mod:`reconciler.fleet.registry`). The same instance with
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
        clocked = ("registered_at", "last_heartbeat_at", "credential_issued_at", "revoked_at")
        params: dict[str, Any] = {f"new_{k}": v for k, v in _values(record).items() if k not in clocked}
        params["alive_within"] = float(alive_within)
        return self._beat(self._upsert_now, record, params, moving_from)

    def beat_with_credential(
        self,
        record: AgentRecord,
        *,
        proven: str,
        lifetime: float,
        moving_from: tuple[str, str] | None = None,
    ) -> AgentRecord:
        """A heartbeat made with the agent's credential, whose fingerprint is ``proven``, at the router
        DB's clock; the row as stored. ``record.identity_fingerprint`` is ``proven``, or the new
        credential's when the agent renews it. Only the row holding that credential is updated, and
        only at the row's URL (its process, or its restart there) or as the move judged against this
        very row (``moving_from``); never a revoked row, nor a credential issued more than ``lifetime``
        seconds ago (0: no expiry, as for a renewal the fleet token vouches for).
        :class:`NotRegistered` otherwise, nothing changed."""
        record.check()
        clocked = ("registered_at", "last_heartbeat_at", "credential_issued_at", "revoked_at")
        params: dict[str, Any] = {f"new_{k}": v for k, v in _values(record).items() if k not in clocked}
        params["proven"], params["lifetime"] = proven, float(lifetime)
        params["from_url"], params["from_instance"] = moving_from or (None, None)
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            stored = connection.execute(self._update_now, params).one_or_none()
            if stored is not None:
                return AgentRecord.from_row(stored)
            held = connection.execute(
                select(AGENTS).where(AGENTS.c.agent_id == record.agent_id)
            ).one_or_none()
        raise NotRegistered(record.agent_id, AgentRecord.from_row(held) if held is not None else None)

    def revoke(self, agent_id: str) -> AgentRecord | None:
        """End the agent's credential (at the router DB's clock; a second revocation keeps the first
        time): its heartbeats are refused, and its id with them, until it is forgotten. The row as
        stored; None for no such agent."""
        c = AGENTS.c
        revoked_at = func.coalesce(c.revoked_at, db_now(self._dialect))
        statement = update(AGENTS).where(c.agent_id == agent_id).values(revoked_at=revoked_at).returning(*c)
        with self._engine.begin() as connection:
            row = connection.execute(statement).one_or_none()
        return AgentRecord.from_row(row) if row is not None else None

    def forget_one(self, agent_id: str, *, alive_within: float) -> bool:
        """Delete the agent's row if it holds no active job and is revoked or silent for ``alive_within``
        seconds (by the router DB's clock): its id may register again. Whether it went."""
        c = AGENTS.c
        busy = exists().where(JobRow.agent_id == c.agent_id, JobRow.status.in_([str(s) for s in ACTIVE]))
        silent = c.last_heartbeat_at < db_now(self._dialect, -float(alive_within))
        condition = and_(c.agent_id == agent_id, ~busy, or_(c.revoked_at.is_not(None), silent))
        with self._engine.begin() as connection:
            return bool(connection.execute(delete(AGENTS).where(condition)).rowcount)

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
        busy = exists().where(JobRow.agent_id == c.agent_id, JobRow.status.in_([str(s) for s in ACTIVE]))
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
        busy = exists().where(JobRow.agent_id == c.agent_id, JobRow.status.in_([str(s) for s in ACTIVE]))
        silent: ColumnElement[bool] = c.last_heartbeat_at < _utc(silent_before)
        kept = c.revoked_at.is_(None)  # a revoked id stays refused until an operator forgets it
        with self._engine.begin() as connection:
            gone = connection.execute(delete(AGENTS).where(silent, ~busy, kept).returning(c.agent_id))
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
        values["credential_issued_at"] = db_now(db_clock)  # a bootstrap issues the credential anew
        values["revoked_at"] = null()
        alive_after = db_now(db_clock, -bindparam("alive_within", type_=Float()))
    upsert = insert(AGENTS).values(values)
    new = upsert.excluded
    # SET and WHERE read the existing row; ``excluded`` is the one proposed.
    updates: dict[str, Any] = {col.name: new[col.name] for col in c if col.name != "agent_id"}
    updates["registered_at"] = case((c.instance == new.instance, c.registered_at), else_=new.registered_at)
    same_identity = c.identity_fingerprint == new.identity_fingerprint
    updates["previous_fingerprint"] = case((same_identity, c.previous_fingerprint), else_="")
    # A bootstrap with the same credential does not make it younger: only a renewal (a new secret)
    # does, so a restarting agent still renews, and an expired credential is renewed, not re-issued.
    updates["credential_issued_at"] = case(
        (same_identity, func.coalesce(c.credential_issued_at, new.credential_issued_at)),
        else_=new.credential_issued_at,
    )
    # Another agent (another URL and instance) takes the id only from one long silent that holds no
    # active job: while it does, its jobs would be addressed to the newcomer, which knows none of them
    # (a stop there would find nothing and the job would run on). A lost agent's jobs end FAILED, so a
    # dead holder frees its id once the sidecar has declared it lost.
    busy = exists().where(JobRow.agent_id == c.agent_id, JobRow.status.in_([str(s) for s in ACTIVE]))
    fingerprint = c.identity_fingerprint
    from_url = bindparam("from_url", type_=String())
    from_instance = bindparam("from_instance", type_=String())
    allowed = or_(
        # The same process: its identity cannot change while it runs (another is an impostor); a row
        # written without one (by a replica older than identities) takes the one it proves.
        and_(c.instance == new.instance, or_(fingerprint == new.identity_fingerprint, fingerprint == "")),
        # Another process at the row's address: the agent restarted there (the call-back checked who
        # answers there), proving the row's identity; a row without one (an agent older than
        # identities) takes any. Another identity there, or none, is another agent (its predecessor's
        # jobs unknown to it, or a fleet-token holder speaking for it): the last clause's.
        and_(
            c.url == new.url,
            c.instance != new.instance,
            or_(fingerprint == "", fingerprint == new.identity_fingerprint),
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
    # A revoked id takes no registration at all, however silent: an operator forgets it first.
    where = and_(c.revoked_at.is_(None), allowed)
    return upsert.on_conflict_do_update(index_elements=[c.agent_id], set_=updates, where=where).returning(*c)


def _credential_update(dialect: str) -> Any:
    """The statement of a heartbeat made with the agent's credential (:meth:`Agents.beat_with_credential`):
    bound parameters ``new_<column>``, ``proven``, ``lifetime``, ``from_url`` and ``from_instance``."""
    c = AGENTS.c
    new: dict[str, Any] = {col.name: bindparam(f"new_{col.name}", type_=col.type) for col in c}
    now = db_now(dialect)
    proven = bindparam("proven", type_=String())
    lifetime = bindparam("lifetime", type_=Float())
    renewing = c.identity_fingerprint != new["identity_fingerprint"]  # the new credential takes over
    kept: tuple[str, ...] = ("url", "labels", "max_jobs", "jobs_running", "version", "draining", "instance")
    kept += ("fence_after_seconds", "fence_grace_seconds", "at_most_once_default", "maintenance", "unwell")
    values: dict[str, Any] = {name: new[name] for name in kept}
    values |= {
        "heartbeat_seconds": new["heartbeat_seconds"],
        "call_token": new["call_token"],
        "identity_fingerprint": new["identity_fingerprint"],
        "last_heartbeat_at": now,
        "registered_at": case((c.instance == new["instance"], c.registered_at), else_=now),
        "previous_fingerprint": case((renewing, c.identity_fingerprint), else_=c.previous_fingerprint),
        # A row from before credentials gets its issue time at its first heartbeat with one.
        "credential_issued_at": case(
            (renewing, now), (c.credential_issued_at.is_(None), now), else_=c.credential_issued_at
        ),
    }
    holds = or_(
        c.identity_fingerprint == proven,
        # A renewal already taken, presented again: its answer was lost, or the agent restarted first.
        and_(c.identity_fingerprint == new["identity_fingerprint"], c.previous_fingerprint == proven),
    )
    fresh = or_(
        lifetime <= 0,
        c.credential_issued_at.is_(None),
        c.credential_issued_at >= db_now(dialect, -lifetime),
    )
    # The process that beats here, its restart at the row's URL, or the move judged against this row.
    from_url = bindparam("from_url", type_=String())
    from_instance = bindparam("from_instance", type_=String())
    where = and_(
        c.agent_id == new["agent_id"],
        c.revoked_at.is_(None),
        c.identity_fingerprint != "",
        holds,
        fresh,
        # Its process at its URL (one process keeps its address: a credential replayed from
        # elsewhere as that process moves nothing), a restart there, or the move judged.
        or_(c.url == new["url"], and_(c.url == from_url, c.instance == from_instance)),
    )
    return update(AGENTS).where(where).values(values).returning(*c)


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
        "previous_fingerprint": record.previous_fingerprint,
        "call_token": record.call_token,
        "credential_issued_at": _utc(record.credential_issued_at) if record.credential_issued_at else None,
        "revoked_at": None,
        "fence_after_seconds": record.fence_after_seconds,
        "fence_grace_seconds": record.fence_grace_seconds,
        "at_most_once_default": record.at_most_once_default,
        "maintenance": record.maintenance,
        "unwell": record.unwell,
    }


def _utc(moment: datetime) -> datetime:
    """SQLite keeps a datetime's wall time without its offset: every one stored or compared is UTC."""
    if moment.tzinfo is None:
        raise ValueError("the router DB needs UTC-aware datetimes")
    return moment.astimezone(UTC)
