"""The router DB's value types: what callers pass in and get back, never ORM objects.

The job's shape in the sidecar's HTTP answers is :func:`sidecar_api.protocol.job_json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
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
    ti_identity: str = ""  # see JobRow.ti_identity
    at_most_once: bool = False  # see JobRow.at_most_once
    fence_seconds: float | None = None  # see JobRow.fence_seconds


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
    at_most_once: bool = False
    fence_seconds: float | None = None

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
            at_most_once=bool(row.at_most_once),
            fence_seconds=row.fence_seconds,
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


# Column widths of the agents table (router_db.models.Agent): PostgreSQL refuses a longer value, SQLite
# would keep it, so both are held to them before writing.
AGENT_ID_CHARS = 200
AGENT_URL_CHARS = 2000
AGENT_VERSION_CHARS = 100
AGENT_INSTANCE_CHARS = 64
AGENT_FINGERPRINT_CHARS = 64  # a SHA-256 in hex
MAX_COUNT = 2**31 - 1  # an Integer column
MAX_HEARTBEAT_SECONDS = 86400.0


AGENT_MAINTENANCE_CHARS = 2000  # a comment of 500, who of 200, two times: the JSON stays well within


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An agent that registered itself, as of its latest heartbeat.

    ``instance`` is a random id the agent process picks at each start: the same id under a new instance
    is that agent restarted. ``max_jobs`` 0 means no limit. ``heartbeat_seconds`` is how often the agent
    says it heartbeats: any replica judges its silence by it. Times are UTC-aware.
    ``identity_fingerprint`` is the fingerprint of the proof the agent's home gives (see
    :mod:`agent_api.registration`); "" for an agent older than identities. That proof is the agent's
    credential: ``previous_fingerprint`` is the one it renewed away, ``credential_issued_at`` when the
    current one was issued (by the router DB's clock), ``revoked_at`` when an operator revoked it.
    ``call_token`` is what the sidecar presents to the agent ("" for an agent older than credentials).
    """

    agent_id: str
    url: str
    labels: tuple[str, ...]
    max_jobs: int
    jobs_running: int
    version: str
    draining: bool
    instance: str
    registered_at: datetime
    last_heartbeat_at: datetime
    heartbeat_seconds: float = 10.0
    identity_fingerprint: str = ""
    previous_fingerprint: str = ""
    call_token: str = field(default="", repr=False)  # a secret
    credential_issued_at: datetime | None = None
    revoked_at: datetime | None = None
    fence_after_seconds: float | None = None  # None: not said
    fence_grace_seconds: float | None = None
    at_most_once_default: bool = False
    maintenance: str = ""  # a JSON object (agent_api.maintenance.Maintenance), or "" for none
    unwell: str = ""  # a JSON object (agent_api.maintenance.Unwell), or "" when well

    def check(self) -> None:
        """Raise ValueError naming the first field the router DB cannot store as given (never its value:
        a URL may carry credentials). The HTTP layer answers it with a 400."""
        texts = {
            "agent_id": self.agent_id,
            "url": self.url,
            "version": self.version,
            "instance": self.instance,
            "identity_fingerprint": self.identity_fingerprint,
            "previous_fingerprint": self.previous_fingerprint,
            "call_token": self.call_token,
            "maintenance": self.maintenance,
            "unwell": self.unwell,
        }
        widths = {
            "agent_id": AGENT_ID_CHARS,
            "url": AGENT_URL_CHARS,
            "version": AGENT_VERSION_CHARS,
            "instance": AGENT_INSTANCE_CHARS,
            "identity_fingerprint": AGENT_FINGERPRINT_CHARS,
            "previous_fingerprint": AGENT_FINGERPRINT_CHARS,
            "call_token": AGENT_FINGERPRINT_CHARS,
            "maintenance": AGENT_MAINTENANCE_CHARS,
            "unwell": AGENT_MAINTENANCE_CHARS,
        }
        for name, value in texts.items():
            if not isinstance(value, str) or "\x00" in value:
                raise ValueError(f"agent {name} must be a string without NUL characters")
            if len(value) > widths[name]:
                raise ValueError(f"agent {name} is longer than {widths[name]} characters")
        if not self.agent_id or not self.url or not self.instance:
            raise ValueError("agent agent_id, url and instance must not be empty")
        if not all(isinstance(label, str) and "\x00" not in label for label in self.labels):
            raise ValueError("agent labels must be strings without NUL characters")
        for name, count in (("max_jobs", self.max_jobs), ("jobs_running", self.jobs_running)):
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_COUNT:
                raise ValueError(f"agent {name} must be an integer from 0 to {MAX_COUNT}")
        every = self.heartbeat_seconds
        if (
            isinstance(every, bool)
            or not isinstance(every, int | float)
            or not 0 < every <= MAX_HEARTBEAT_SECONDS
        ):
            raise ValueError(
                f"agent heartbeat_seconds must be a number above 0, at most {MAX_HEARTBEAT_SECONDS}"
            )
        for name, moment in (
            ("registered_at", self.registered_at),
            ("last_heartbeat_at", self.last_heartbeat_at),
        ):
            if moment.tzinfo is None:
                raise ValueError(f"agent {name} must be a UTC-aware datetime")

    @classmethod
    def from_row(cls, row: Any) -> AgentRecord:
        """A record from a Core row of the agents table."""
        return cls(
            agent_id=row.agent_id,
            url=row.url,
            labels=tuple(json.loads(row.labels)),
            max_jobs=row.max_jobs,
            jobs_running=row.jobs_running,
            version=row.version,
            draining=bool(row.draining),
            instance=row.instance,
            registered_at=row.registered_at,
            last_heartbeat_at=row.last_heartbeat_at,
            heartbeat_seconds=row.heartbeat_seconds,
            identity_fingerprint=row.identity_fingerprint,
            previous_fingerprint=row.previous_fingerprint,
            call_token=row.call_token,
            credential_issued_at=row.credential_issued_at,
            revoked_at=row.revoked_at,
            fence_after_seconds=row.fence_after_seconds,
            fence_grace_seconds=row.fence_grace_seconds,
            at_most_once_default=bool(row.at_most_once_default),
            maintenance=row.maintenance,
            unwell=row.unwell,
        )


class AgentConflict(Exception):
    """Another live agent holds this id: one at another URL, started as another instance, that sent a
    heartbeat recently. The message names its URL and last heartbeat time."""

    def __init__(self, existing: AgentRecord) -> None:
        self.existing = existing
        super().__init__(
            f"agent id {existing.agent_id!r} is held by a live agent at {existing.url}"
            f" (last heartbeat {existing.last_heartbeat_at.isoformat(timespec='seconds')})"
        )


class NotRegistered(Exception):
    """No registration of this agent id holds the credential presented (none at all, or another
    credential, or one revoked or expired): ``held`` is the row as it is, if there is one."""

    def __init__(self, agent_id: str, held: AgentRecord | None) -> None:
        self.held = held
        super().__init__(f"agent id {agent_id!r}: no registration holds this credential")
