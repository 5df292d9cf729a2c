"""The sidecar's router API as both sides speak it: statuses, bounds, request parsing, answer shapes.

The sidecar's HTTP layer parses with these functions and the Airflow provider
(:mod:`agentic_airflow`) reads answers with the same words, without importing the sidecar. Standard
library only: this module runs inside Airflow too. Parsing is strict; :class:`WireError` names the
field and the bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from agent_api.protocol import JOB_ID_PATTERN

MAX_INT = 2**31 - 1  # map_index, try_number, timeouts, log offsets: beyond any real value, in every DB's int
MAX_NAME_CHARS = 250  # dag_id, task_id, run_id: Airflow's own limit
MAX_COMMAND_BYTES = 64 * 1024
MAX_TI_IDENTITY_CHARS = 64
MAX_STATUS_CHARS = 32
MAX_LIST_LIMIT = 10_000
DEFAULT_LIST_LIMIT = 1000


class WireError(ValueError):
    """A request does not have the documented shape; the message names the field (answered 400)."""


class JobStatus(StrEnum):
    """A job's status in the router DB and in every answer about it."""

    QUEUED = "QUEUED"  # recorded, not (yet) known to run on its agent
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"  # a stop is decided and under way; the status it will end with is recorded
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.STOPPING})
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED})


def job_not_found(job_id: str) -> str:
    """The ``error`` of a 404 for an unknown job: the one answer that tells a waiting task that the
    sidecar will never know its job (any other 404 may be a proxy's), so both sides build it here."""
    return f"job not found: {job_id}"


def validate_job_id(value: str) -> str:
    if JOB_ID_PATTERN.fullmatch(value) is None:
        raise WireError("job id must match ^" + JOB_ID_PATTERN.pattern + "$")
    return value


def validate_name(field: str, value: str) -> str:
    """A DAG, task or run id: 1 to :data:`MAX_NAME_CHARS` characters."""
    if not value or len(value) > MAX_NAME_CHARS:
        raise WireError(f"{field} must be 1-{MAX_NAME_CHARS} characters")
    return value


# ---------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, kw_only=True)
class SubmitRequest:
    """``POST /jobs``: start one task-instance try's command on an agent."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    command: str
    agent_id: str | None
    labels: list[str]
    # What the agent's POST /run receives: command, cwd, env, run_as, timeout_seconds, and at_most_once
    # when true (an agent too old to fence refuses it then, rather than run it unfenced).
    payload: dict[str, Any]
    ti_identity: str = ""  # the task instance's id (Airflow 3) or its run's logical date (Airflow 2)


def parse_submit(body: object) -> SubmitRequest:
    obj = _object(body)
    command = _field(obj, "command", str)
    if not command.strip() or len(command.encode()) > MAX_COMMAND_BYTES:
        raise WireError(f"command must be non-empty and at most {MAX_COMMAND_BYTES} bytes")
    ids = {name: validate_name(name, _field(obj, name, str)) for name in ("dag_id", "task_id", "run_id")}
    map_index = _field(obj, "map_index", int, default=-1)
    try_number = _field(obj, "try_number", int)
    if not (-1 <= map_index <= MAX_INT and 0 <= try_number <= MAX_INT):
        raise WireError(f"map_index must be -1 to {MAX_INT} and try_number 0 to {MAX_INT}")
    agent_id = _field(obj, "agent_id", str, default=None)
    labels = _field(obj, "labels", list, default=[])
    if not all(isinstance(label, str) for label in labels):
        raise WireError("labels must be a list of strings")
    env = _field(obj, "env", dict, default=None)
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise WireError("env must map strings to strings")
    timeout = obj.get("timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_INT
    ):
        raise WireError(f"timeout_seconds must be a positive number up to {MAX_INT}, or null")
    payload = {
        "command": command,
        "cwd": _field(obj, "cwd", str, default=None),
        "env": env,
        "run_as": _field(obj, "run_as", str, default=None),
        "timeout_seconds": timeout,
    }
    if _field(obj, "at_most_once", bool, default=False):
        payload["at_most_once"] = True
    ti_identity = _field(obj, "ti_identity", str, default="")
    if len(ti_identity) > MAX_TI_IDENTITY_CHARS:
        raise WireError(f"ti_identity must be at most {MAX_TI_IDENTITY_CHARS} characters")
    return SubmitRequest(
        **ids,
        map_index=map_index,
        try_number=try_number,
        command=command,
        agent_id=agent_id,
        labels=labels,
        payload=payload,
        ti_identity=ti_identity,
    )


@dataclass(frozen=True, kw_only=True)
class UpdateRequest:
    """``POST /jobs/update_status``: someone reports a task's new state. The job is named by
    ``job_id``, or by ``dag_id``/``task_id``/``run_id``/``map_index`` (its newest try)."""

    status: str
    reason: str | None
    job_id: str | None
    dag_id: str = ""
    task_id: str = ""
    run_id: str = ""
    map_index: int = -1
    force: bool = False  # stop without Airflow's confirmation: a person's override, said in the audit


def parse_update(body: object) -> UpdateRequest:
    obj = _object(body)
    status = _field(obj, "status", str)
    if not status or len(status) > MAX_STATUS_CHARS:
        raise WireError(f"status must be 1-{MAX_STATUS_CHARS} characters")
    reason = _field(obj, "reason", str, default=None)
    force = _field(obj, "force", bool, default=False)
    job_id = _field(obj, "job_id", str, default=None)
    if job_id is not None:
        if JOB_ID_PATTERN.fullmatch(job_id) is None:
            raise WireError("job_id must match " + JOB_ID_PATTERN.pattern)
        return UpdateRequest(status=status, reason=reason, job_id=job_id, force=force)
    dag_id, task_id, run_id = (_field(obj, name, str) for name in ("dag_id", "task_id", "run_id"))
    map_index = _field(obj, "map_index", int, default=-1)
    if not -1 <= map_index <= MAX_INT:
        raise WireError(f"map_index must be -1 to {MAX_INT}")
    return UpdateRequest(
        status=status,
        reason=reason,
        job_id=None,
        dag_id=dag_id,
        task_id=task_id,
        run_id=run_id,
        map_index=map_index,
        force=force,
    )


def parse_status(value: str) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        raise WireError(f"unknown status {value!r}; one of {[s.value for s in JobStatus]}") from None


MAX_WAIT_SECONDS = 60.0  # GET /jobs/{id}?wait=: the longest long-poll
_NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")  # JSON's number


def parse_wait(value: str | None) -> float:
    """``GET /jobs/{id}``'s ``wait``: seconds, 0 (or absent: answer at once) to
    :data:`MAX_WAIT_SECONDS`, a number as JSON writes one (``30``, ``2.5``)."""
    if value is None:
        return 0.0
    seconds = float(value) if _NUMBER.fullmatch(value) else math.nan
    if not 0 <= seconds <= MAX_WAIT_SECONDS:  # NaN fails too
        raise WireError(f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}, e.g. 30 or 2.5")
    return seconds


# ----------------------------------------------------------------------------------------- answers


class TaskInstanceIds(Protocol):
    @property
    def dag_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def map_index(self) -> int: ...
    @property
    def try_number(self) -> int: ...


class Job(Protocol):
    """What an answer about a job is made from (the router DB's record)."""

    @property
    def job_id(self) -> str: ...
    @property
    def key(self) -> TaskInstanceIds: ...
    @property
    def ti_identity(self) -> str: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def status(self) -> JobStatus: ...
    @property
    def rc(self) -> int | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...
    @property
    def stop_requested_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...


def job_json(job: Job) -> dict[str, Any]:
    """``GET /jobs/{id}``: the job as the router DB records it."""
    return {
        "job_id": job.job_id,
        "dag_id": job.key.dag_id,
        "task_id": job.key.task_id,
        "run_id": job.key.run_id,
        "map_index": job.key.map_index,
        "try_number": job.key.try_number,
        "ti_identity": job.ti_identity,
        "agent_id": job.agent_id,
        "status": str(job.status),
        "rc": job.rc,
        "reason": job.reason,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "stop_requested_at": _iso(job.stop_requested_at),
        "finished_at": _iso(job.finished_at),
    }


def submit_json(job: Job, *, created: bool) -> dict[str, Any]:
    """``POST /jobs``: 201 when ``created``, 200 for a resubmission of the same try."""
    return {
        "job_id": job.job_id,
        "agent_id": job.agent_id,
        "status": str(job.status),
        "created": created,
        # A job the agent refused is FAILED at once: the caller needs to know why.
        "rc": job.rc,
        "reason": job.reason,
    }


def update_json(
    *, ok: bool, message: str, action: str, job: Job | None, previous: JobStatus | None = None
) -> dict[str, Any]:
    """``POST /jobs/update_status``: what was done (``action``) and the job before and after."""
    return {
        "ok": ok,
        "message": message,
        "action": action,
        "job_id": job.job_id if job else None,
        "previous_status": str(previous) if previous else (str(job.status) if job else None),
        "status": str(job.status) if job else None,
        "rc": job.rc if job else None,
    }


def agent_json(
    *,
    agent_id: str,
    url: str,
    labels: list[str],
    state: str,
    last_contact_at: datetime | None,
    max_jobs: int | None,
    active_jobs: int,
    jobs_running: int | None,
    version: str | None,
    draining: bool,
    registered: bool = False,
    maintenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One agent of ``GET /agents`` (and the answer to a drain): ``state`` is one of live, suspect,
    draining, lost, wrong_identity; ``max_jobs``, ``jobs_running`` and ``version`` are the agent's own
    last answer (null: not said, by an older agent or none yet; ``max_jobs`` 0: no limit);
    ``active_jobs`` is the router DB's count of its queued, running and stopping jobs; ``registered``:
    the agent registered itself (``last_contact_at`` is then its last heartbeat), else it is configured
    in ``[[agents]]``; ``maintenance``: while it drains, by whom, since when, why, and when what still
    runs is stopped, as the agent keeps it (null: not draining, or not said)."""
    return {
        "agent_id": agent_id,
        "url": url,
        "labels": labels,
        "state": state,
        "last_contact_at": _iso(last_contact_at),
        "max_jobs": max_jobs,
        "active_jobs": active_jobs,
        "jobs_running": jobs_running,
        "version": version,
        "draining": draining,
        "registered": registered,
        "maintenance": maintenance,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


_MISSING: Any = object()


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise WireError("body must be a JSON object")
    return body


def _field(body: Mapping[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise WireError(f"missing field {name!r}")
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 1.0 is the integer 1 (fractions stay refused)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"field {name!r} must be {kind.__name__}")
    return value
