"""Queries and status transitions of the router database.

Transitions are compare-and-set updates (``WHERE status = <expected>``): the sidecar API, the poll
loop and other replicas may race on one job, and exactly one of them wins each transition.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, create_engine, delete, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from router_db.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Job, JobEvent, JobStatus, Lease
from router_db.schema import upgrade

# Which status may follow which. Terminal statuses are final.
_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.STOPPING, *TERMINAL_STATUSES}),
    JobStatus.RUNNING: frozenset({JobStatus.STOPPING, *TERMINAL_STATUSES}),
    JobStatus.STOPPING: TERMINAL_STATUSES,
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
}


class StaleTransition(Exception):
    """The job was not in a status from which the transition is allowed (someone else moved it)."""


@dataclass(frozen=True, slots=True)
class TaskInstanceKey:
    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1


@dataclass(frozen=True, slots=True)
class NewJob:
    key: TaskInstanceKey
    agent_id: str
    command: str
    ti_identity: str = ""  # see Job.ti_identity


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    key: TaskInstanceKey
    agent_id: str
    command: str
    status: JobStatus
    rc: int | None
    reason: str | None
    stop_status: JobStatus | None
    created_at: datetime
    updated_at: datetime
    stop_requested_at: datetime | None
    finished_at: datetime | None
    ti_identity: str = ""

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "job_id": self.job_id,
            "dag_id": self.key.dag_id,
            "task_id": self.key.task_id,
            "run_id": self.key.run_id,
            "map_index": self.key.map_index,
            "try_number": self.key.try_number,
            "ti_identity": self.ti_identity,
            "agent_id": self.agent_id,
            "status": str(self.status),
            "rc": self.rc,
            "reason": self.reason,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "stop_requested_at": iso(self.stop_requested_at),
            "finished_at": iso(self.finished_at),
        }


@dataclass(frozen=True, slots=True)
class EventRecord:
    job_id: str
    at: datetime
    old_status: JobStatus | None
    new_status: JobStatus
    source: str
    reason: str | None


def _now() -> datetime:
    return datetime.now(UTC)


def _record(row: Any) -> JobRecord:
    """A record from an ORM object or a Core row of the jobs table.

    DAG, task, run and agent ids and commands repeat across thousands of jobs: interning them keeps
    one copy each, which is most of an active job's memory in the reconciler's view.
    """
    return JobRecord(
        job_id=row.job_id,
        key=TaskInstanceKey(
            sys.intern(row.dag_id),
            sys.intern(row.task_id),
            sys.intern(row.run_id),
            row.map_index,
            row.try_number,
        ),
        agent_id=sys.intern(row.agent_id),
        command=sys.intern(row.command),
        status=JobStatus(row.status),
        rc=row.rc,
        reason=row.reason,
        stop_status=JobStatus(row.stop_status) if row.stop_status else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
        stop_requested_at=row.stop_requested_at,
        finished_at=row.finished_at,
        ti_identity=row.ti_identity,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the loop writes; busy_timeout waits for a lock instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite (one machine) or PostgreSQL (``postgresql+psycopg://``)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class RouterDB:
    """The router database. Methods are synchronous and short; async callers use a thread."""

    def __init__(self, url_or_engine: str | Engine) -> None:
        self.engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create the schema, or migrate an existing one to this version's (idempotent)."""
        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._sessions() as session:
            session.execute(select(1))

    # --- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._sessions() as session:
            row = session.get(Job, job_id)
            return _record(row) if row is not None else None

    def get_many(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The jobs of these ids that exist, by id."""
        found: dict[str, JobRecord] = {}
        with self._sessions() as session:
            for chunk in _chunks(job_ids):
                query = select(Job.__table__).where(Job.job_id.in_(chunk))
                found.update((row.job_id, _record(row)) for row in session.execute(query))
        return found

    def find(self, key: TaskInstanceKey, ti_identity: str = "") -> JobRecord | None:
        """The job of exactly this task-instance try (the reverse mapping)."""
        with self._sessions() as session:
            query = select(Job).where(*_key_filter(key), Job.ti_identity == ti_identity)
            row = session.scalars(query).one_or_none()
            return _record(row) if row is not None else None

    def find_latest(self, dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> JobRecord | None:
        """The newest try's job of a task instance."""
        with self._sessions() as session:
            row = session.scalars(
                select(Job)
                .where(
                    Job.dag_id == dag_id,
                    Job.task_id == task_id,
                    Job.run_id == run_id,
                    Job.map_index == map_index,
                )
                .order_by(Job.try_number.desc(), Job.created_at.desc())  # a re-created run's is newer
                .limit(1)
            ).one_or_none()
            return _record(row) if row is not None else None

    def search(
        self,
        *,
        dag_id: str | None = None,
        run_id: str | None = None,
        statuses: Iterable[JobStatus] | None = None,
        limit: int = 1000,
    ) -> list[JobRecord]:
        query = select(Job).order_by(Job.created_at, Job.job_id).limit(limit)
        if dag_id is not None:
            query = query.where(Job.dag_id == dag_id)
        if run_id is not None:
            query = query.where(Job.run_id == run_id)
        if statuses is not None:
            query = query.where(Job.status.in_([str(s) for s in statuses]))
        with self._sessions() as session:
            return [_record(row) for row in session.scalars(query)]

    def active(self, *, agent_id: str | None = None) -> list[JobRecord]:
        """Every job the router still considers active (queued, running, or stopping), or those
        of one agent."""
        query = (
            select(Job.__table__)
            .where(Job.status.in_([str(s) for s in ACTIVE_STATUSES]))
            .execution_options(yield_per=2000)  # stream rows: no buffer of every row at once
        )
        if agent_id is not None:
            query = query.where(Job.agent_id == agent_id)
        with self._sessions() as session:  # Core rows: no identity map for tens of thousands of jobs
            return [_record(row) for row in session.execute(query)]

    def changed_since(self, moment: datetime) -> list[JobRecord]:
        """Jobs of any status updated at or after ``moment``: keeps an in-memory view current."""
        query = select(Job.__table__).where(Job.updated_at >= moment)
        with self._sessions() as session:
            return [_record(row) for row in session.execute(query)]

    def events(self, job_id: str) -> list[EventRecord]:
        with self._sessions() as session:
            rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [
                EventRecord(
                    job_id=row.job_id,
                    at=row.at,
                    old_status=JobStatus(row.old_status) if row.old_status else None,
                    new_status=JobStatus(row.new_status),
                    source=row.source,
                    reason=row.reason,
                )
                for row in rows
            ]

    # --- leases (one leader among replicas) --------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Take or renew lease ``name`` for ``ttl_seconds`` of the database's clock; True if held now.

        A compare-and-set: the UPDATE matches only a lease that is expired or already ours, and the
        INSERT of a missing lease loses to any concurrent one on the primary key. Two replicas racing
        therefore never both win, and a renewal after expiry succeeds only if nobody took over.
        """
        now, until = self._db_now(), self._db_now(ttl_seconds)
        with self._sessions() as session, session.begin():
            taken = session.execute(
                update(Lease)
                .where(Lease.name == name, (Lease.holder == holder) | (Lease.expires_at <= now))
                .values(holder=holder, expires_at=until)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                return True
        try:
            with self._sessions() as session, session.begin():
                session.execute(insert(Lease).values(name=name, holder=holder, expires_at=until))
        except IntegrityError:
            return False  # the lease exists and is someone else's, or another replica inserted first
        return True

    def release_lease(self, name: str, holder: str) -> bool:
        """Give lease ``name`` up if ``holder`` has it, so a standby takes over at once."""
        with self._sessions() as session, session.begin():
            gone = session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))
            return gone.rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def lease_holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now by the database's clock; None when it is free or expired."""
        query = select(Lease.holder).where(Lease.name == name, Lease.expires_at > self._db_now())
        with self._sessions() as session:
            return session.scalars(query).one_or_none()

    def _db_now(self, plus_seconds: float = 0.0) -> ColumnElement[Any]:
        """The database's current time (plus an offset), as a SQL expression of its own clock."""
        if self.engine.dialect.name == "sqlite":
            # Same text format as stored datetimes (to the millisecond), so comparisons order correctly.
            return func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{plus_seconds:+.3f} seconds")
        return func.now() + timedelta(seconds=plus_seconds)

    # --- writes ----------------------------------------------------------------------------------

    def submit(self, new: NewJob, *, source: str = "submit") -> tuple[JobRecord, bool]:
        """Create a QUEUED job for a task-instance try; returns ``(job, created)``.

        A second submission of the same try returns the existing job: an operator whose worker
        died after submitting must not start the command twice.
        """
        now = _now()
        row = Job(
            job_id=uuid.uuid4().hex,
            dag_id=new.key.dag_id,
            task_id=new.key.task_id,
            run_id=new.key.run_id,
            map_index=new.key.map_index,
            try_number=new.key.try_number,
            ti_identity=new.ti_identity,
            agent_id=new.agent_id,
            command=new.command,
            status=str(JobStatus.QUEUED),
            created_at=now,
            updated_at=now,
        )
        try:
            with self._sessions.begin() as session:
                session.add(row)
                session.flush()
                session.add(_event(row.job_id, now, None, JobStatus.QUEUED, source, "submitted"))
        except IntegrityError:
            existing = self.find(new.key, new.ti_identity)
            if existing is None:  # the conflict was something else
                raise
            return existing, False
        return _record(row), True

    def import_running(self, jobs: Sequence[NewJob], *, source: str) -> list[str]:
        """Record many jobs already running on their agents, in one transaction (migrations,
        benchmarks). Returns their job ids; the audit trail gets one RUNNING event each."""
        now = _now()
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
            session.execute(insert(Job), rows)
            session.execute(insert(JobEvent), events)
        return ids

    def mark_running(self, job_id: str, *, source: str) -> JobRecord:
        return self._apply_one(Transition.running(job_id), source)

    def request_stop(self, job_id: str, *, stop_status: JobStatus, reason: str, source: str) -> JobRecord:
        """Record the stop intent before the agent is called, so that a crash cannot lose it."""
        return self._apply_one(Transition.stop(job_id, stop_status, reason), source)

    def finish(
        self, job_id: str, *, status: JobStatus, rc: int | None, reason: str | None, source: str
    ) -> JobRecord:
        return self._apply_one(Transition.finish(job_id, status, rc, reason), source)

    def apply(self, transitions: Sequence[Transition], *, source: str) -> list[JobRecord | None]:
        """Apply many transitions in one transaction (one commit for a burst of stops).

        Each is a compare-and-set on the job's current status; the result is the updated job, or
        ``None`` where the job is unknown or no longer in a status the transition may follow.
        """
        now = _now()
        applied: list[str] = []
        with self._sessions.begin() as session:
            current: dict[str, str] = {}
            for chunk in _chunks([t.job_id for t in transitions]):
                statuses = session.execute(select(Job.job_id, Job.status).where(Job.job_id.in_(chunk)))
                current.update((job_id, status) for job_id, status in statuses)
            for t in transitions:
                old = current.get(t.job_id)
                if old is None or t.new not in _ALLOWED[JobStatus(old)]:
                    continue
                result = session.execute(
                    update(Job)
                    .where(Job.job_id == t.job_id, Job.status == old)
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
                    (r.job_id, _record(r))
                    for r in session.execute(select(Job.__table__).where(Job.job_id.in_(chunk)))
                )
        done = set(applied)
        return [rows[t.job_id] if t.job_id in done else None for t in transitions]

    def _apply_one(self, transition: Transition, source: str) -> JobRecord:
        (result,) = self.apply([transition], source=source)
        if result is not None:
            return result
        current = self.get(transition.job_id)
        if current is None:
            raise KeyError(transition.job_id)
        raise StaleTransition(f"job {transition.job_id} is {current.status}; cannot become {transition.new}")


@dataclass(frozen=True, slots=True)
class Transition:
    """One status change: to RUNNING, to STOPPING with the status to record once stopped, or final."""

    job_id: str
    new: JobStatus
    reason: str | None
    stop_status: JobStatus | None = None
    rc: int | None = None

    @classmethod
    def running(cls, job_id: str) -> Transition:
        return cls(job_id, JobStatus.RUNNING, "started on agent")

    @classmethod
    def stop(cls, job_id: str, stop_status: JobStatus, reason: str) -> Transition:
        if stop_status not in TERMINAL_STATUSES:
            raise ValueError(f"stop_status must be terminal, not {stop_status}")
        return cls(job_id, JobStatus.STOPPING, reason, stop_status=stop_status)

    @classmethod
    def finish(cls, job_id: str, status: JobStatus, rc: int | None, reason: str | None) -> Transition:
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish needs a terminal status, not {status}")
        return cls(job_id, status, reason, rc=rc)

    def values(self, now: datetime) -> dict[str, Any]:
        """Columns set besides status, reason and updated_at."""
        if self.new is JobStatus.STOPPING:
            return {"stop_status": str(self.stop_status), "stop_requested_at": now}
        if self.new in TERMINAL_STATUSES:
            return {"rc": self.rc, "finished_at": now}
        return {}


def _chunks(ids: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    """Bounded IN lists: SQLite and PostgreSQL both cap bound parameters per statement."""
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _key_filter(key: TaskInstanceKey) -> Sequence[Any]:
    return (
        Job.dag_id == key.dag_id,
        Job.task_id == key.task_id,
        Job.run_id == key.run_id,
        Job.map_index == key.map_index,
        Job.try_number == key.try_number,
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
