"""A job's durable state: its directory, ``state.json`` and the files the supervisor writes.

Layout of ``<home>/jobs/<job_id>/``:

- ``state.json`` — the agent's record (:class:`JobRecord`), replaced atomically (temp file + fsync +
  ``os.replace``), so a crash leaves either the old or the new version, never a torn one;
- ``output.log`` — stdout and stderr of the job, plus one line from the agent when it stops the job;
- ``leader.json`` — ``{"pid", "create_time"}`` of the job's shell, written by the supervisor;
- ``exit.json`` — ``{"rc", "finished_at"}``, written by the supervisor when the shell is reaped;
- ``supervisor.log`` — the supervisor's own diagnostics.

The job's environment is never written to disk (it may hold secrets); it reaches the supervisor
through a pipe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from agent.jobfiles import (
    EXIT_FILE,
    LEADER_FILE,
    LOG_FILE,
    STATE_FILE,
    SUPERVISOR_LOG_FILE,
    write_json_atomic,
)
from agent.process_tree import ProcessRef
from agent.protocol import JobInfo, JobStatus, format_time, parse_time

_T = TypeVar("_T")


class StateError(ValueError):
    """A state file exists but cannot be understood."""


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class ExitRecord:
    rc: int
    finished_at: datetime


@dataclass(frozen=True)
class JobRecord:
    """What the agent knows about one job; ``state.json`` holds exactly this."""

    job_id: str
    status: JobStatus
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None  # of the leader; the PID is trusted only together with it
    rc: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    timeout_seconds: float | None = None
    supervisor: ProcessRef | None = None
    # every process seen in the tree while it ran, so escaped ones (setsid) are found at stop time
    descendants: frozenset[ProcessRef] = field(default_factory=frozenset)
    # the stop intent, written before the first signal: a restarted agent finishes the stop
    stop_reason: str | None = None

    @property
    def leader(self) -> ProcessRef | None:
        if self.pid is None or self.create_time is None:
            return None
        return ProcessRef(self.pid, self.create_time)

    def info(self) -> JobInfo:
        return JobInfo(
            job_id=self.job_id,
            status=self.status,
            pid=self.pid,
            rc=self.rc,
            started_at=self.started_at,
            finished_at=self.finished_at,
            reason=self.reason,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "pid": self.pid,
            "pgid": self.pgid,
            "create_time": self.create_time,
            "rc": self.rc,
            "started_at": format_time(self.started_at),
            "finished_at": format_time(self.finished_at),
            "reason": self.reason,
            "timeout_seconds": self.timeout_seconds,
            "supervisor": self.supervisor.to_json() if self.supervisor else None,
            "descendants": [ref.to_json() for ref in sorted(self.descendants)],
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_json(cls, value: object) -> JobRecord:
        if not isinstance(value, dict):
            raise StateError("state is not a JSON object")
        try:
            supervisor = value.get("supervisor")
            return cls(
                job_id=str(value["job_id"]),
                status=JobStatus(value["status"]),
                pid=_opt(value.get("pid"), int),
                pgid=_opt(value.get("pgid"), int),
                create_time=_opt(value.get("create_time"), float),
                rc=_opt(value.get("rc"), int),
                started_at=parse_time(value.get("started_at"), "started_at"),
                finished_at=parse_time(value.get("finished_at"), "finished_at"),
                reason=_opt(value.get("reason"), str),
                timeout_seconds=_opt(value.get("timeout_seconds"), float),
                supervisor=ProcessRef.from_json(supervisor) if supervisor is not None else None,
                descendants=frozenset(ProcessRef.from_json(ref) for ref in value.get("descendants", [])),
                stop_reason=_opt(value.get("stop_reason"), str),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"invalid state: {exc}") from None


def _opt(value: object, kind: type[_T]) -> _T | None:
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


class JobDir:
    """The files of one job, read and written as the agent's types."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def leader_path(self) -> Path:
        return self.path / LEADER_FILE

    @property
    def exit_path(self) -> Path:
        return self.path / EXIT_FILE

    @property
    def supervisor_log_path(self) -> Path:
        return self.path / SUPERVISOR_LOG_FILE

    def read_state(self) -> JobRecord | None:
        value = _read_json(self.state_path)
        return JobRecord.from_json(value) if value is not None else None

    def write_state(self, record: JobRecord, *, durable: bool = True) -> None:
        write_json_atomic(self.state_path, record.to_json(), durable=durable)

    def read_leader(self) -> ProcessRef | None:
        value = _read_json(self.leader_path)
        if value is None:
            return None
        try:
            return ProcessRef(int(value["pid"]), float(value["create_time"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.leader_path}: {exc}") from None

    def read_exit(self) -> ExitRecord | None:
        value = _read_json(self.exit_path)
        if value is None:
            return None
        try:
            finished_at = parse_time(value["finished_at"], "finished_at")
            if finished_at is None or isinstance(value["rc"], bool):
                raise ValueError("finished_at is null")
            return ExitRecord(rc=int(value["rc"]), finished_at=finished_at)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.exit_path}: {exc}") from None

    def append_log(self, text: str) -> None:
        with self.log_path.open("ab") as log:
            log.write(text.encode("utf-8", "replace"))

    def read_log(self, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes from ``offset``, and the log's size."""
        try:
            with self.log_path.open("rb") as log:
                size = os.fstat(log.fileno()).st_size
                log.seek(offset)
                return log.read(limit), size
        except FileNotFoundError:
            return b"", 0
