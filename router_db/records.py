"""The router DB's value types: what callers pass in and get back, never ORM objects.

The job's shape in the sidecar's HTTP answers is :func:`sidecar_api.protocol.job_json`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sidecar_api.protocol import ACTIVE, JobStatus


@dataclass(frozen=True, slots=True, kw_only=True)
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
        return self.status in ACTIVE

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        """A record from an ORM object or a Core row of the jobs table.

        DAG, task, run and agent ids and commands repeat across thousands of jobs: interning them keeps
        one copy each, which is most of an active job's memory in the reconciler's view.
        """
        return cls(
            job_id=row.job_id,
            key=TaskInstanceKey(
                dag_id=sys.intern(row.dag_id),
                task_id=sys.intern(row.task_id),
                run_id=sys.intern(row.run_id),
                map_index=row.map_index,
                try_number=row.try_number,
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


@dataclass(frozen=True, slots=True)
class EventRecord:
    job_id: str
    at: datetime
    old_status: JobStatus | None
    new_status: JobStatus
    source: str
    reason: str | None

    @classmethod
    def from_row(cls, row: Any) -> EventRecord:
        """A record from an ORM object of the job_events table."""
        return cls(
            job_id=row.job_id,
            at=row.at,
            old_status=JobStatus(row.old_status) if row.old_status else None,
            new_status=JobStatus(row.new_status),
            source=row.source,
            reason=row.reason,
        )
