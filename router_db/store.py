"""Queries and status transitions of the router database: :class:`RouterDB`.

Transitions are compare-and-set updates (``WHERE status = <expected>``): the sidecar API, the poll
loop and other replicas may race on one job, and exactly one of them wins each transition. The value
types are in :mod:`router_db.records`, the transition rules in :mod:`router_db.transitions`, the
engine in :mod:`router_db.engine`, the leases in :mod:`router_db.leases` and the registered agents in
:mod:`router_db.agents`. Every time written here for another process to compare is the router DB's
(:meth:`RouterDB.now`, :mod:`router_db.clock`), never the writing replica's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from router_db.agents import Agents
from router_db.clock import db_now
from router_db.engine import make_engine
from router_db.leases import Leases
from router_db.models import JobEvent, JobRow
from router_db.records import AgentRecord, EventRecord, JobRecord, NewJob, TaskInstanceKey
from router_db.schema import upgrade
from router_db.transitions import OneTransition, Transition, allowed
from sidecar_api.protocol import ACTIVE, TERMINAL, JobStatus


class RouterDB(OneTransition):
    """The router database. Methods are synchronous and short; async callers use a thread."""

    def __init__(self, url_or_engine: str | Engine) -> None:
        self.engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._leases = Leases(self.engine, self._sessions)
        self._agents = Agents(self.engine)
        self._clock = select(db_now(self.engine.dialect.name))

    def create_schema(self) -> None:
        """Create the schema, or migrate an existing one to this version's (idempotent): what
        ``python -m reconciler db upgrade`` does. The sidecar's start uses
        :func:`router_db.schema.prepare_for_start`, which migrates only when told to."""
        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._sessions() as session:
            session.execute(select(1))

    def now(self) -> datetime:
        """The router DB's time now (see :mod:`router_db.clock`): every time written here for another
        process to compare (``created_at``, ``updated_at``, heartbeats) is taken from it, and so must
        the "now" it is compared with be."""
        with self._sessions() as session:
            return self._time(session)

    # --- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._sessions() as session:
            row = session.get(JobRow, job_id)
            return JobRecord.from_row(row) if row is not None else None

    def get_many(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The jobs of these ids that exist, by id."""
        found: dict[str, JobRecord] = {}
        with self._sessions() as session:
            for chunk in _chunks(job_ids):
                query = select(JobRow.__table__).where(JobRow.job_id.in_(chunk))
                found.update((row.job_id, JobRecord.from_row(row)) for row in session.execute(query))
        return found

    def find(self, key: TaskInstanceKey, ti_identity: str = "") -> JobRecord | None:
        """The job of exactly this task-instance try (the reverse mapping)."""
        with self._sessions() as session:
            query = select(JobRow).where(*_key_filter(key), JobRow.ti_identity == ti_identity)
            row = session.scalars(query).one_or_none()
            return JobRecord.from_row(row) if row is not None else None

    def find_latest(self, *, dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> JobRecord | None:
        """The newest try's job of a task instance."""
        with self._sessions() as session:
            row = session.scalars(
                select(JobRow)
                .where(
                    JobRow.dag_id == dag_id,
                    JobRow.task_id == task_id,
                    JobRow.run_id == run_id,
                    JobRow.map_index == map_index,
                )
                .order_by(JobRow.try_number.desc(), JobRow.created_at.desc())  # a re-created run's is newer
                .limit(1)
            ).one_or_none()
            return JobRecord.from_row(row) if row is not None else None

    def active_tries(self, *, dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> list[JobRecord]:
        """Every active job of a task instance, whatever its try (a cleared task's older tries)."""
        with self._sessions() as session:
            rows = session.scalars(
                select(JobRow).where(
                    JobRow.dag_id == dag_id,
                    JobRow.task_id == task_id,
                    JobRow.run_id == run_id,
                    JobRow.map_index == map_index,
                    JobRow.status.in_([str(s) for s in ACTIVE]),
                )
            ).all()
            return [JobRecord.from_row(row) for row in rows]

    def search(
        self,
        *,
        dag_id: str | None = None,
        run_id: str | None = None,
        statuses: Iterable[JobStatus] | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[JobRecord]:
        """Jobs matching every filter given (``since``: created at or after), oldest first (the API's
        order), or newest first (the pages': the first ``limit`` are then the latest)."""
        order = (
            (JobRow.created_at.desc(), JobRow.job_id.desc())
            if newest_first
            else (JobRow.created_at, JobRow.job_id)
        )
        query = select(JobRow).order_by(*order).limit(limit)
        if dag_id is not None:
            query = query.where(JobRow.dag_id == dag_id)
        if run_id is not None:
            query = query.where(JobRow.run_id == run_id)
        if statuses is not None:
            query = query.where(JobRow.status.in_([str(s) for s in statuses]))
        if agent_id is not None:
            query = query.where(JobRow.agent_id == agent_id)
        if since is not None:
            query = query.where(JobRow.created_at >= since)
        with self._sessions() as session:
            return [JobRecord.from_row(row) for row in session.scalars(query)]

    def active(self, *, agent_id: str | None = None) -> list[JobRecord]:
        """Every job the router still considers active (queued, running, or stopping), or those
        of one agent."""
        query = (
            select(JobRow.__table__)
            .where(JobRow.status.in_([str(s) for s in ACTIVE]))
            .execution_options(yield_per=2000)  # stream rows: no buffer of every row at once
        )
        if agent_id is not None:
            query = query.where(JobRow.agent_id == agent_id)
        with self._sessions() as session:  # Core rows: no identity map for tens of thousands of jobs
            return [JobRecord.from_row(row) for row in session.execute(query)]

    def active_counts(self) -> dict[str, int]:
        """Active jobs (queued, running or stopping) per agent id, agents without any left out: what
        each agent carries as far as the router knows, the measure of its free capacity."""
        query = (
            select(JobRow.agent_id, func.count())
            .where(JobRow.status.in_([str(s) for s in ACTIVE]))
            .group_by(JobRow.agent_id)
        )
        with self._sessions() as session:
            return {agent_id: int(count) for agent_id, count in session.execute(query)}

    def _time(self, session: Session) -> datetime:
        """The router DB's time now, read on ``session``."""
        if self.engine.dialect.name == "sqlite":
            # SQLite's 'now' is this process's own clock, to the millisecond: the same clock read here to
            # the microsecond, so that jobs written within one millisecond still keep their order.
            return datetime.now(UTC)
        return _utc(session.scalar(self._clock))

    def changes_since(self, moment: datetime | None) -> tuple[datetime, list[JobRecord]]:
        """The router DB's time as the read began, and the jobs of any status updated at or after
        ``moment`` (none read when it is None): keeps an in-memory view current, each read going on from
        the previous one's time, on the clock every writer uses. The time is taken first, in the same
        transaction, so the read sees every change committed before it."""
        with self._sessions() as session:
            began = self._time(session)
            if moment is None:
                return began, []
            query = select(JobRow.__table__).where(JobRow.updated_at >= moment)
            return began, [JobRecord.from_row(row) for row in session.execute(query)]

    def events(self, job_id: str) -> list[EventRecord]:
        with self._sessions() as session:
            rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [EventRecord.from_row(row) for row in rows]

    # --- retention ------------------------------------------------------------------------------

    def prune_finished(self, before: datetime, *, batch: int = 500, dry_run: bool = False) -> int:
        """Delete jobs that ended before ``before`` (their last change: ``updated_at``), with their
        audit rows, ``batch`` jobs a transaction so no lock is held for long; active jobs are never
        touched, however old. The number of jobs deleted (that would be, with ``dry_run``)."""
        if before.tzinfo is None:
            raise ValueError("prune_finished needs a UTC-aware moment")
        finished = [str(s) for s in TERMINAL]
        old = (JobRow.updated_at < before, JobRow.status.in_(finished))
        if dry_run:
            with self._sessions() as session:
                return int(session.scalar(select(func.count()).select_from(JobRow).where(*old)) or 0)
        deleted = 0
        while True:
            with self._sessions.begin() as session:
                # Oldest first, along ix_jobs_updated_at: each batch reads only the rows it deletes.
                oldest = select(JobRow.job_id).where(*old).order_by(JobRow.updated_at).limit(batch)
                ids = list(session.scalars(oldest))
                if not ids:
                    return deleted
                session.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids)))
                # The status again: a job is never deleted unless it has ended.
                gone = delete(JobRow).where(JobRow.job_id.in_(ids), JobRow.status.in_(finished))
                deleted += cast(CursorResult[Any], session.execute(gone)).rowcount
            if len(ids) < batch:
                return deleted

    # --- leases (one holder among replicas, see router_db.leases) ----------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Take or renew lease ``name`` for ``ttl_seconds`` of the database's clock; True if held now."""
        return self._leases.acquire(name, holder, ttl_seconds)

    def release_lease(self, name: str, holder: str) -> bool:
        """Give lease ``name`` up if ``holder`` has it, so a standby takes over at once."""
        return self._leases.release(name, holder)

    def lease_holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now by the database's clock; None when it is free or expired."""
        return self._leases.holder(name)

    # --- registered agents (see router_db.agents) ---------------------------------------------------

    def heartbeat_agent(
        self, record: AgentRecord, *, alive_after: datetime, moving_from: tuple[str, str] | None = None
    ) -> AgentRecord:
        """Register an agent or record its heartbeat; the row as stored. Raises :class:`AgentConflict`,
        changing nothing, when another agent that heartbeat at or after ``alive_after`` holds the id
        (unless ``moving_from`` names that row's URL and instance and the identity is the row's: a proven
        move), and ValueError for a record the router DB cannot store (:meth:`AgentRecord.check`)."""
        return self._agents.heartbeat(record, alive_after=alive_after, moving_from=moving_from)

    def heartbeat_agent_now(
        self, record: AgentRecord, *, alive_within: float, moving_from: tuple[str, str] | None = None
    ) -> AgentRecord:
        """:meth:`heartbeat_agent` for a heartbeat heard now: its time (and a new instance's
        ``registered_at``) is the router DB's, not the record's, and another agent whose last heartbeat
        is less than ``alive_within`` seconds old by that clock holds the id. One statement."""
        return self._agents.heartbeat_now(record, alive_within=alive_within, moving_from=moving_from)

    def beat_agent_with_credential(
        self,
        record: AgentRecord,
        *,
        proven: str,
        lifetime: float,
        moving_from: tuple[str, str] | None = None,
    ) -> AgentRecord:
        """A heartbeat made with the agent's own credential (fingerprint ``proven``): only the row
        holding it is updated, at the router DB's clock; :class:`NotRegistered` otherwise."""
        return self._agents.beat_with_credential(
            record, proven=proven, lifetime=lifetime, moving_from=moving_from
        )

    def revoke_agent(self, agent_id: str) -> AgentRecord | None:
        """End a registered agent's credential; its row as stored, None for no such agent."""
        return self._agents.revoke(agent_id)

    def forget_agent(self, agent_id: str, *, alive_within: float) -> bool:
        """Delete a revoked, or silent and idle, agent's row so its id may register again."""
        return self._agents.forget_one(agent_id, alive_within=alive_within)

    def registered_agent(self, agent_id: str) -> AgentRecord | None:
        """One registered agent's row, if it has one."""
        return self._agents.get(agent_id)

    def live_agent_at(self, url: str, *, other_than: str, alive_within: float) -> AgentRecord | None:
        """Another registered agent at ``url`` that heartbeat less than ``alive_within`` seconds ago by
        the router DB's clock, if any."""
        return self._agents.live_at(url, other_than=other_than, alive_within=alive_within)

    def registered_agents(self) -> list[AgentRecord]:
        """Every registered agent, by agent id."""
        return self._agents.all()

    def leave_agent(self, agent_id: str, instance: str) -> bool:
        """The agent process stops for good: its row goes unless it still has an active job."""
        return self._agents.leave(agent_id, instance)

    def forget_agents(self, *, silent_before: datetime) -> list[str]:
        """Delete the agents silent since before ``silent_before`` that have no active job; their ids."""
        return self._agents.forget(silent_before=silent_before)

    # --- writes ----------------------------------------------------------------------------------

    def submit(self, new: NewJob, *, source: str = "submit") -> tuple[JobRecord, bool]:
        """Create a QUEUED job for a task-instance try; returns ``(job, created)``.

        A second submission of the same try returns the existing job: an operator whose worker
        died after submitting must not start the command twice.
        """
        row = JobRow(
            job_id=uuid.uuid4().hex,
            dag_id=new.key.dag_id,
            task_id=new.key.task_id,
            run_id=new.key.run_id,
            map_index=new.key.map_index,
            try_number=new.key.try_number,
            ti_identity=new.ti_identity,
            at_most_once=new.at_most_once,
            fence_seconds=new.fence_seconds,
            agent_id=new.agent_id,
            command=new.command,
            status=str(JobStatus.QUEUED),
        )
        try:
            with self._sessions.begin() as session:
                # The router DB's time, read in the transaction that writes it (no connection of its own).
                row.created_at = row.updated_at = now = self._time(session)
                session.add(row)
                session.flush()
                session.add(_event(row.job_id, now, None, JobStatus.QUEUED, source, "submitted"))
        except IntegrityError:
            existing = self.find(new.key, new.ti_identity)
            if existing is None:  # the conflict was something else
                raise
            return existing, False
        return JobRecord.from_row(row), True

    def forget_unstarted(self, job_id: str, *, agent_id: str) -> bool:
        """Delete a job, with its audit rows, that is still QUEUED on ``agent_id``: one its agent
        refused to start (full or draining), so that the task's next submission of the same try is
        routed afresh instead of finding this job. False, deleting nothing, if it has moved since."""
        unstarted = (
            JobRow.job_id == job_id,
            JobRow.status == str(JobStatus.QUEUED),
            JobRow.agent_id == agent_id,
        )
        with self._sessions.begin() as session:
            # One guarded statement: a job that moved meanwhile is left whole. Its audit rows go with
            # it (ON DELETE CASCADE, which the SQLite engine turns on).
            gone = cast(CursorResult[Any], session.execute(delete(JobRow).where(*unstarted)))
            return gone.rowcount == 1

    def import_running(self, jobs: Sequence[NewJob], *, source: str) -> list[str]:
        """Record many jobs already running on their agents, in one transaction (migrations,
        benchmarks). Returns their job ids; the audit trail gets one RUNNING event each."""
        now = self.now()
        ids = [uuid.uuid4().hex for _ in jobs]
        rows = [
            {
                "job_id": job_id,
                "dag_id": new.key.dag_id,
                "task_id": new.key.task_id,
                "run_id": new.key.run_id,
                "map_index": new.key.map_index,
                "try_number": new.key.try_number,
                "ti_identity": new.ti_identity,
                "at_most_once": new.at_most_once,
                "fence_seconds": new.fence_seconds,
                "agent_id": new.agent_id,
                "command": new.command,
                "status": str(JobStatus.RUNNING),
                "created_at": now,
                "updated_at": now,
            }
            for job_id, new in zip(ids, jobs, strict=True)
        ]
        events = [
            {
                "job_id": job_id,
                "at": now,
                "new_status": str(JobStatus.RUNNING),
                "source": source,
                "reason": "imported",
            }
            for job_id in ids
        ]
        with self._sessions.begin() as session:
            session.execute(insert(JobRow), rows)
            session.execute(insert(JobEvent), events)
        return ids

    def apply(self, transitions: Sequence[Transition], *, source: str) -> list[JobRecord | None]:
        """Apply many transitions in one transaction (one commit for a burst of stops).

        Each is a compare-and-set on the job's current status; the result is the updated job, or
        ``None`` where the job is unknown or no longer in a status the transition may follow (or, for
        one with ``expect``, no longer in that status).
        """
        applied: list[str] = []
        with self._sessions.begin() as session:
            now = self._time(session)  # the router DB's, in the transaction that writes it
            current: dict[str, str] = {}
            for chunk in _chunks([t.job_id for t in transitions]):
                statuses = session.execute(
                    select(JobRow.job_id, JobRow.status).where(JobRow.job_id.in_(chunk))
                )
                current.update((job_id, status) for job_id, status in statuses)
            for t in transitions:
                old = current.get(t.job_id)
                if old is None or not allowed(JobStatus(old), t.new):
                    continue
                if t.expect is not None and old != str(t.expect):
                    continue
                result = session.execute(
                    update(JobRow)
                    .where(JobRow.job_id == t.job_id, JobRow.status == old)
                    .values(status=str(t.new), reason=t.reason, updated_at=now, **t.values(now))
                )
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    continue  # another writer moved it first
                current[t.job_id] = str(t.new)  # a later transition of the same job in this batch sees it
                session.add(_event(t.job_id, now, JobStatus(old), t.new, source, t.reason))
                applied.append(t.job_id)
            session.flush()
            rows: dict[str, JobRecord] = {}
            for chunk in _chunks(applied):
                rows.update(
                    (r.job_id, JobRecord.from_row(r))
                    for r in session.execute(select(JobRow.__table__).where(JobRow.job_id.in_(chunk)))
                )
        done = set(applied)
        return [rows[t.job_id] if t.job_id in done else None for t in transitions]


def _chunks(ids: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    """Bounded IN lists: SQLite and PostgreSQL both cap bound parameters per statement."""
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _key_filter(key: TaskInstanceKey) -> Sequence[Any]:
    return (
        JobRow.dag_id == key.dag_id,
        JobRow.task_id == key.task_id,
        JobRow.run_id == key.run_id,
        JobRow.map_index == key.map_index,
        JobRow.try_number == key.try_number,
    )


def _event(
    job_id: str, at: datetime, old: JobStatus | None, new: JobStatus, source: str, reason: str | None
) -> JobEvent:
    return JobEvent(
        job_id=job_id,
        at=at,
        old_status=str(old) if old is not None else None,
        new_status=str(new),
        source=source,
        reason=reason,
    )


def _utc(moment: datetime | None) -> datetime:
    """A time read from the router DB, in UTC (PostgreSQL answers in the session's time zone)."""
    if moment is None:
        raise RuntimeError("the router DB did not tell its time")
    return moment.astimezone(UTC)
