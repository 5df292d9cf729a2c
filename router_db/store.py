"""Queries and status transitions of the router database.

Transitions are compare-and-set updates (``WHERE status = <expected>``): the sidecar API, the poll
loop and other replicas may race on one job, and exactly one of them wins each transition.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from router_db.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Base, Job, JobEvent, JobStatus

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


@dataclass(frozen=True)
class TaskInstanceKey:
    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1


@dataclass(frozen=True)
class NewJob:
    key: TaskInstanceKey
    agent_id: str
    command: str


@dataclass(frozen=True)
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
            "agent_id": self.agent_id,
            "status": str(self.status),
            "rc": self.rc,
            "reason": self.reason,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "stop_requested_at": iso(self.stop_requested_at),
            "finished_at": iso(self.finished_at),
        }


@dataclass(frozen=True)
class EventRecord:
    job_id: str
    at: datetime
    old_status: JobStatus | None
    new_status: JobStatus
    source: str
    reason: str | None


def _now() -> datetime:
    return datetime.now(UTC)


def _record(row: Job) -> JobRecord:
    return JobRecord(
        job_id=row.job_id,
        key=TaskInstanceKey(row.dag_id, row.task_id, row.run_id, row.map_index, row.try_number),
        agent_id=row.agent_id,
        command=row.command,
        status=JobStatus(row.status),
        rc=row.rc,
        reason=row.reason,
        stop_status=JobStatus(row.stop_status) if row.stop_status else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
        stop_requested_at=row.stop_requested_at,
        finished_at=row.finished_at,
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
        Base.metadata.create_all(self.engine)

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

    def find(self, key: TaskInstanceKey) -> JobRecord | None:
        """The job of exactly this task-instance try (the reverse mapping)."""
        with self._sessions() as session:
            row = session.scalars(select(Job).where(*_key_filter(key))).one_or_none()
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
                .order_by(Job.try_number.desc())
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

    def active(self) -> list[JobRecord]:
        """Every job the router still considers active (queued, running, or stopping)."""
        with self._sessions() as session:
            rows = session.scalars(select(Job).where(Job.status.in_([str(s) for s in ACTIVE_STATUSES])))
            return [_record(row) for row in rows]

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
            existing = self.find(new.key)
            if existing is None:  # the conflict was something else
                raise
            return existing, False
        return _record(row), True

    def mark_running(self, job_id: str, *, source: str) -> JobRecord:
        return self._transition(job_id, JobStatus.RUNNING, source=source, reason="started on agent")

    def request_stop(self, job_id: str, *, stop_status: JobStatus, reason: str, source: str) -> JobRecord:
        """Record the stop intent before the agent is called, so that a crash cannot lose it."""
        if stop_status not in TERMINAL_STATUSES:
            raise ValueError(f"stop_status must be terminal, not {stop_status}")
        now = _now()
        return self._transition(
            job_id,
            JobStatus.STOPPING,
            source=source,
            reason=reason,
            values={"stop_status": str(stop_status), "stop_requested_at": now},
            now=now,
        )

    def finish(
        self, job_id: str, *, status: JobStatus, rc: int | None, reason: str | None, source: str
    ) -> JobRecord:
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish needs a terminal status, not {status}")
        now = _now()
        return self._transition(
            job_id, status, source=source, reason=reason, values={"rc": rc, "finished_at": now}, now=now
        )

    def _transition(
        self,
        job_id: str,
        new: JobStatus,
        *,
        source: str,
        reason: str | None,
        values: dict[str, Any] | None = None,
        now: datetime | None = None,
    ) -> JobRecord:
        now = now or _now()
        with self._sessions.begin() as session:
            current = session.get(Job, job_id)
            if current is None:
                raise KeyError(job_id)
            old = JobStatus(current.status)
            if new not in _ALLOWED[old]:
                raise StaleTransition(f"job {job_id} is {old}; cannot become {new}")
            result = session.execute(
                update(Job)
                .where(Job.job_id == job_id, Job.status == str(old))
                .values(status=str(new), reason=reason, updated_at=now, **(values or {}))
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise StaleTransition(f"job {job_id} changed while moving from {old} to {new}")
            session.add(_event(job_id, now, old, new, source, reason))
            session.flush()
            session.expire(current)
            return _record(session.get_one(Job, job_id))


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
