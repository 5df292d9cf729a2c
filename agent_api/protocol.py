"""The agent's wire format: job ids, statuses and the JSON shapes of its HTTP API.

The server and :class:`agent_api.client.AgentClient` both parse with these functions, so a field that one
side accepts the other side produces. Parsing is strict: a missing key, a wrong type or an unknown key
in a request raises :class:`ProtocolError` with a message naming the field; nothing is half-filled.

Job ids match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``: 1 to 128 characters, ASCII letters, digits,
``.``, ``_`` and ``-``, starting with a letter or digit. A job id names a directory on the agent, so
``/`` is excluded and a leading ``.`` is not allowed (no ``..``, no hidden names).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from agent_api.errors import ProtocolError as ProtocolError  # where every parser's error lives
from agent_api.maintenance import Maintenance

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A change cursor (``GET /jobs?changed_since=``): opaque to clients, who keep it and pass it back.
MAX_CURSOR_CHARS = 64
CURSOR_PATTERN = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_CURSOR_CHARS}}}")
MAX_REASON_CHARS = 2000
_E = TypeVar("_E", bound="StrEnum")


class AgentJobStatus(StrEnum):
    """A job's status on its agent: the words of the router DB's ``JobStatus``, less its ``STOPPING``."""

    QUEUED = "QUEUED"  # accepted, process not started yet
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"  # ended by itself with rc 0
    FAILED = "FAILED"  # rc != 0, killed by a signal, stopped, or could not start

    @property
    def finished(self) -> bool:
        return self in (AgentJobStatus.SUCCEEDED, AgentJobStatus.FAILED)


class StopAction(StrEnum):
    """What a stop request did."""

    TERMINATED = "terminated"  # the tree ended within the grace period after SIGTERM
    KILLED = "killed"  # SIGKILL was needed (grace ran out, or force=true)
    ALREADY_FINISHED = "already_finished"  # nothing to do; status and rc are the recorded ones


def validate_job_id(value: object) -> str:
    """Return ``value`` if it is a valid job id, else raise :class:`ProtocolError`."""
    if not isinstance(value, str):
        raise ProtocolError(f"job_id must be a string, got {type(value).__name__}")
    if JOB_ID_PATTERN.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ProtocolError(
            f"job_id {shown!r} is invalid: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


def validate_cursor(value: object, name: str = "cursor") -> str:
    """Return ``value`` if it has a change cursor's form, else raise :class:`ProtocolError`."""
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_CURSOR_CHARS:
        raise ProtocolError(f"{name} is longer than {MAX_CURSOR_CHARS} characters")
    if CURSOR_PATTERN.fullmatch(value) is None:
        raise ProtocolError(
            f"{name} {value!r} is invalid: use 1-{MAX_CURSOR_CHARS} characters from A-Z a-z 0-9 . _ -"
        )
    return value


# ---------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RunPayload:
    command: str
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    run_as: str | None = None
    timeout_seconds: float | None = None
    # Fenced: stopped by its agent once cut off from the sidecar (agent/fence.py). Sent only when true,
    # so an agent that cannot fence refuses such a job (an unknown key) rather than run it unfenced.
    at_most_once: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "cwd": self.cwd,
            "env": dict(self.env) if self.env is not None else None,
            "run_as": self.run_as,
            "timeout_seconds": self.timeout_seconds,
            **({"at_most_once": True} if self.at_most_once else {}),
        }


@dataclass(frozen=True)
class RunRequest:
    job_id: str
    payload: RunPayload


@dataclass(frozen=True)
class StopRequest:
    force: bool = False
    reason: str = ""


def parse_run_request(body: object) -> RunRequest:
    obj = _object(body, "request body")
    _no_unknown_keys(obj, {"job_id", "payload"}, "request body")
    if "job_id" not in obj:
        raise ProtocolError("job_id is missing")
    job_id = validate_job_id(obj["job_id"])
    if "payload" not in obj:
        raise ProtocolError("payload is missing")
    return RunRequest(job_id=job_id, payload=parse_run_payload(obj["payload"]))


def parse_run_payload(value: object) -> RunPayload:
    obj = _object(value, "payload")
    _no_unknown_keys(obj, {"command", "cwd", "env", "run_as", "timeout_seconds", "at_most_once"}, "payload")
    command = obj.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ProtocolError("payload.command must be a non-empty string")
    _no_nul(command, "payload.command")
    cwd = _optional_str(obj, "cwd", "payload.cwd")
    if cwd is not None and not cwd.startswith("/"):
        raise ProtocolError("payload.cwd must be an absolute path")
    run_as = _optional_str(obj, "run_as", "payload.run_as")
    if run_as is not None and not run_as:
        raise ProtocolError("payload.run_as must be a user name, not empty")
    at_most_once = obj.get("at_most_once", False)
    if not isinstance(at_most_once, bool):
        raise ProtocolError("payload.at_most_once must be true or false")
    return RunPayload(
        command=command,
        cwd=cwd,
        env=_parse_env(obj.get("env")),
        run_as=run_as,
        timeout_seconds=_parse_timeout(obj.get("timeout_seconds")),
        at_most_once=at_most_once,
    )


def parse_stop_request(body: object) -> StopRequest:
    obj = _object(body, "request body")
    _no_unknown_keys(obj, {"force", "reason"}, "request body")
    force = obj.get("force", False)
    if not isinstance(force, bool):
        raise ProtocolError("force must be true or false")
    reason = obj.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str):
        raise ProtocolError("reason must be a string")
    if len(reason) > MAX_REASON_CHARS:
        raise ProtocolError(f"reason is longer than {MAX_REASON_CHARS} characters")
    return StopRequest(force=force, reason=reason)


def _parse_env(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("payload.env must be an object of strings or null")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ProtocolError(f"payload.env has an invalid variable name {key!r}")
        if not isinstance(item, str):
            raise ProtocolError(f"payload.env[{key!r}] must be a string")
        _no_nul(item, f"payload.env[{key!r}]")
        env[key] = item
    return env


def _parse_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError("payload.timeout_seconds must be a number or null")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ProtocolError("payload.timeout_seconds must be a positive finite number")
    return seconds


# ----------------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class JobInfo:
    """What ``GET /jobs/{job_id}`` and ``POST /run`` answer."""

    job_id: str
    status: AgentJobStatus
    pid: int | None
    rc: int | None
    started_at: datetime | None
    finished_at: datetime | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "pid": self.pid,
            "rc": self.rc,
            "started_at": format_time(self.started_at),
            "finished_at": format_time(self.finished_at),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, value: object) -> JobInfo:
        obj = _object(value, "job")
        return cls(
            job_id=validate_job_id(_required(obj, "job_id")),
            status=_enum(AgentJobStatus, _required(obj, "status"), "status"),
            pid=_optional_int(obj, "pid"),
            rc=_optional_int(obj, "rc"),
            started_at=parse_time(_required(obj, "started_at"), "started_at"),
            finished_at=parse_time(_required(obj, "finished_at"), "finished_at"),
            reason=_optional_str(obj, "reason", "reason", required=True),
        )


@dataclass(frozen=True)
class StopResult:
    """What ``POST /stop/{job_id}`` answers."""

    ok: bool
    message: str
    status: AgentJobStatus
    rc: int | None
    action: StopAction
    signal: str | None  # "SIGTERM" or "SIGKILL"; None when nothing was sent
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "message": self.message,
            "status": self.status.value,
            "rc": self.rc,
            "action": self.action.value,
            "signal": self.signal,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, value: object) -> StopResult:
        obj = _object(value, "stop result")
        ok = _required_bool(obj, "ok")
        message = _required(obj, "message")
        if not isinstance(message, str):
            raise ProtocolError("message must be a string")
        signal = _optional_str(obj, "signal", "signal", required=True)
        if signal not in (None, "SIGTERM", "SIGKILL"):
            raise ProtocolError(f"signal {signal!r} is not SIGTERM, SIGKILL or null")
        return cls(
            ok=ok,
            message=message,
            status=_enum(AgentJobStatus, _required(obj, "status"), "status"),
            rc=_optional_int(obj, "rc"),
            action=_enum(StopAction, _required(obj, "action"), "action"),
            signal=signal,
            reason=_optional_str(obj, "reason", "reason", required=True),
        )


@dataclass(frozen=True)
class DrainState:
    """What ``POST /drain`` and ``POST /undrain`` answer: whether the agent takes new jobs, and how
    many of its jobs are still unfinished (a drained agent's VM can stop once that is 0)."""

    agent_id: str
    draining: bool
    jobs_running: int
    maintenance: Maintenance | None = None  # the drain's who, when and why (None: not said)

    def to_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "draining": self.draining,
            "jobs_running": self.jobs_running,
            "maintenance": self.maintenance.to_json() if self.maintenance is not None else None,
        }

    @classmethod
    def from_json(cls, value: object) -> DrainState:
        obj = _object(value, "drain state")
        agent_id = _required(obj, "agent_id")
        if not isinstance(agent_id, str) or not agent_id:
            raise ProtocolError("agent_id must be a non-empty string")
        draining = _required_bool(obj, "draining")
        jobs_running = _optional_int(obj, "jobs_running")
        if jobs_running is None or jobs_running < 0:
            raise ProtocolError("jobs_running must be an integer >= 0")
        return cls(
            agent_id=agent_id,
            draining=draining,
            jobs_running=jobs_running,
            maintenance=Maintenance.from_json(obj.get("maintenance")),
        )


@dataclass(frozen=True)
class JobChanges:
    """What ``GET /jobs?changed_since=<cursor>`` answers: the jobs whose state changed since the cursor,
    each as it is now, in the order of their last change; ``cursor`` to pass next time. ``full``: the
    cursor was empty or not of this agent process (it restarted), and ``jobs`` is every job it knows:
    one not listed is unknown to it (never run there, or removed by retention)."""

    jobs: tuple[JobInfo, ...]
    cursor: str
    full: bool

    def to_json(self) -> dict[str, Any]:
        return {"jobs": [job.to_json() for job in self.jobs], "cursor": self.cursor, "full": self.full}

    @classmethod
    def from_json(cls, value: object) -> JobChanges:
        obj = _object(value, "changes")
        jobs = _required(obj, "jobs")
        if not isinstance(jobs, list):
            raise ProtocolError("jobs must be a list")
        full = _required_bool(obj, "full")
        return cls(
            jobs=tuple(JobInfo.from_json(job) for job in jobs),
            cursor=validate_cursor(_required(obj, "cursor")),
            full=full,
        )


@dataclass(frozen=True)
class LogChunk:
    """Bytes of a job's output from some offset; ``size`` is the whole log's size when read."""

    data: bytes
    next_offset: int
    size: int


# ------------------------------------------------------------------------------------------ values


def format_time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def parse_time(value: object, name: str) -> datetime | None:
    """ISO-8601 with a UTC offset, or null."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be an ISO-8601 string or null")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ProtocolError(f"{name} is not an ISO-8601 time: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise ProtocolError(f"{name} has no UTC offset")
    return parsed


def _object(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{name} must be a JSON object")
    return value


def _no_unknown_keys(obj: Mapping[str, Any], allowed: set[str], name: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError(f"{name} has unknown keys: {', '.join(map(repr, unknown))}")


def _required(obj: Mapping[str, Any], key: str) -> object:
    if key not in obj:
        raise ProtocolError(f"{key} is missing")
    return obj[key]


def _required_bool(obj: Mapping[str, Any], key: str) -> bool:
    value = _required(obj, key)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key} must be true or false")
    return value


def _optional_int(obj: Mapping[str, Any], key: str) -> int | None:
    value = _required(obj, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{key} must be an integer or null")
    return value


def _optional_str(obj: Mapping[str, Any], key: str, name: str, *, required: bool = False) -> str | None:
    value = _required(obj, key) if required else obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string or null")
    _no_nul(value, name)
    return value


def _enum(kind: type[_E], value: object, name: str) -> _E:
    if isinstance(value, str) and value in kind.__members__.values():
        return kind(value)
    raise ProtocolError(f"{name} {value!r} is not one of {', '.join(kind)}")


def _no_nul(value: str, name: str) -> None:
    if "\0" in value:
        raise ProtocolError(f"{name} contains a NUL character")
