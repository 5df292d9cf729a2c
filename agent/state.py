"""A job's durable state: its directory, ``state.json`` and the files the supervisor writes.

Layout of ``<home>/jobs/<job_id>/``:

- ``state.json`` — the agent's record (:class:`StoredJob`), replaced atomically (temp file + fsync +
  ``os.replace``), so a crash leaves either the old or the new version, never a torn one;
- ``output.log`` — stdout and stderr of the job, plus one line from the agent when it stops the job;
- ``leader.json`` — ``{"pid", "start_ticks", "started_at"}`` of the job's shell, written by the
  supervisor (:class:`ShellRecord`; the file keeps the name older agents gave it);
- ``exit.json`` — ``{"rc", "finished_at"}``, written by the supervisor when the shell is reaped;
- ``supervisor.log`` — the supervisor's own diagnostics;
- ``output.pipe`` — the job's output pipe while it may have writers (see :class:`agent.logcap.PipeFile`).

The job's environment is never written to disk (it may hold secrets); it reaches the supervisor
through a pipe.

``state.json`` formats (the ``format`` key; a file without one is format 1):

1. processes identified by PID and psutil's wall-clock create time (``create_time`` floats). Such an
   identity breaks when the system clock is stepped, so a format-1 record is read without its process
   identities: the agent cannot verify those processes and never signals them.
2. processes identified by PID and start ticks since boot (``start_ticks`` integers, see
   :mod:`agent.procfs`), plus the ``boot_id`` of the boot those ticks count from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from agent.jobfiles import (
    EXIT_FILE,
    LOG_FILE,
    LOG_MARK_FILE,
    READ_MARKER_FILE,
    SHELL_FILE,
    STATE_FILE,
    SUPERVISOR_LOG_FILE,
    write_json_atomic,
)
from agent.process_tree import ProcessRef
from agent_api.protocol import AgentJobStatus, JobInfo, format_time, parse_time

_T = TypeVar("_T")

STATE_FORMAT = 2


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
class ShellRecord:
    """The job's shell as its supervisor announces it (its answer to the agent and ``leader.json``)."""

    ref: ProcessRef
    started_at: datetime

    @classmethod
    def from_json(cls, value: object) -> ShellRecord:
        """Raises ValueError (or KeyError, TypeError) on anything but a well-formed announcement."""
        if not isinstance(value, dict):
            raise TypeError(f"not a JSON object: {value!r}")
        started_at = parse_time(value["started_at"], "started_at")
        if started_at is None:
            raise ValueError("started_at is null")
        return cls(ProcessRef.from_json([value["pid"], value["start_ticks"]]), started_at)


@dataclass(frozen=True)
class StoredJob:
    """What the agent knows about one job; ``state.json`` holds exactly this."""

    job_id: str
    status: AgentJobStatus
    # the boot the start ticks below count from; they mean nothing after a reboot
    boot_id: str | None = None
    pid: int | None = None
    pgid: int | None = None
    start_ticks: int | None = None  # of the shell; the PID is trusted only together with it
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
    # as read from disk; below STATE_FORMAT the process identities were dropped as unverifiable
    state_format: int = STATE_FORMAT
    # stopped by the fence once the agent is cut off from the sidecar (agent/fence.py)
    at_most_once: bool = False

    @property
    def shell(self) -> ProcessRef | None:
        if self.pid is None or self.start_ticks is None:
            return None
        return ProcessRef(self.pid, self.start_ticks)

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
            "format": self.state_format,
            "job_id": self.job_id,
            "status": self.status.value,
            "boot_id": self.boot_id,
            "pid": self.pid,
            "pgid": self.pgid,
            "start_ticks": self.start_ticks,
            "rc": self.rc,
            "started_at": format_time(self.started_at),
            "finished_at": format_time(self.finished_at),
            "reason": self.reason,
            "timeout_seconds": self.timeout_seconds,
            "supervisor": self.supervisor.to_json() if self.supervisor else None,
            "descendants": [ref.to_json() for ref in sorted(self.descendants)],
            "stop_reason": self.stop_reason,
            "at_most_once": self.at_most_once,
        }

    @classmethod
    def from_json(cls, value: object) -> StoredJob:
        if not isinstance(value, dict):
            raise StateError("state is not a JSON object")
        try:
            version = value.get("format", 1)
            if type(version) is not int or version not in (1, STATE_FORMAT):
                raise ValueError(f"state format {version!r} is not one this agent reads (1, {STATE_FORMAT})")
            record = cls(
                job_id=str(value["job_id"]),
                status=AgentJobStatus(value["status"]),
                pid=_opt(value.get("pid"), int),
                pgid=_opt(value.get("pgid"), int),
                rc=_opt(value.get("rc"), int),
                started_at=parse_time(value.get("started_at"), "started_at"),
                finished_at=parse_time(value.get("finished_at"), "finished_at"),
                reason=_opt(value.get("reason"), str),
                timeout_seconds=_opt(value.get("timeout_seconds"), float),
                stop_reason=_opt(value.get("stop_reason"), str),
                state_format=version,
                at_most_once=_flag(value.get("at_most_once", False), "at_most_once"),
            )
            if version == 1:
                return record  # wall-clock identities: dropped, so that nothing can act on them
            supervisor = value.get("supervisor")
            if not isinstance(value["boot_id"], str):
                raise TypeError(f"boot_id must be a string, got {value['boot_id']!r}")
            return replace(
                record,
                boot_id=value["boot_id"],
                start_ticks=_opt(value.get("start_ticks"), int),
                supervisor=ProcessRef.from_json(supervisor) if supervisor is not None else None,
                descendants=frozenset(ProcessRef.from_json(ref) for ref in value.get("descendants", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"invalid state: {exc}") from None


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")
    return value


def _opt(value: object, kind: type[_T]) -> _T | None:
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


class JobDir:
    """The files of one job, read and written as the agent's types.

    ``on_state`` is told every record once ``state.json`` holds it: every change of a job passes
    there, so the agent's change index (:mod:`agent.changes`) learns of each one in this one place.
    """

    def __init__(self, path: Path, *, on_state: Callable[[StoredJob], None] | None = None) -> None:
        self.path = path
        self.on_state = on_state

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def shell_path(self) -> Path:
        return self.path / SHELL_FILE

    @property
    def exit_path(self) -> Path:
        return self.path / EXIT_FILE

    @property
    def supervisor_log_path(self) -> Path:
        return self.path / SUPERVISOR_LOG_FILE

    def read_state(self) -> StoredJob | None:
        value = _read_json(self.state_path)
        return StoredJob.from_json(value) if value is not None else None

    def write_state(self, record: StoredJob, *, durable: bool = True) -> None:
        write_json_atomic(self.state_path, record.to_json(), durable=durable)
        if self.on_state is not None:
            self.on_state(record)

    def read_shell(self) -> ShellRecord | None:
        value = _read_json(self.shell_path)
        if value is None:
            return None
        try:
            return ShellRecord.from_json(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.shell_path}: {exc}") from None

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

    def read_log_mark(self) -> int:
        """How far the output has been taken into the task's log (0 when never, or unreadable)."""
        try:
            value = int(self.log_mark_path.read_text(encoding="ascii"))
        except (OSError, ValueError):
            return 0
        return max(0, value)

    def write_log_mark(self, offset: int) -> None:
        # Not fsynced: a mark lost with the VM's power only repeats a few lines in the task's log.
        write_json_atomic(self.log_mark_path, offset, durable=False)

    @property
    def log_mark_path(self) -> Path:
        return self.path / LOG_MARK_FILE

    @property
    def read_marker_path(self) -> Path:
        return self.path / READ_MARKER_FILE

    def size(self) -> int:
        """Bytes the directory's files take on disk (a capped log's dropped middle takes none)."""
        total = 0
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    try:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512  # on disk
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            return 0
        return total
