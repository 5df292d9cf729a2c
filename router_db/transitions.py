"""Which job status may follow which, and the status changes callers ask the router DB for.

:class:`router_db.store.RouterDB` applies a :class:`Transition` as a compare-and-set on the job's current
status; a transition that :func:`allowed` refuses, or that another writer overtook, is not applied.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from router_db.records import JobRecord
from sidecar_api.protocol import TERMINAL, JobStatus

# Which status may follow which. Terminal statuses are final.
_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.STOPPING, *TERMINAL}),
    JobStatus.RUNNING: frozenset({JobStatus.STOPPING, *TERMINAL}),
    JobStatus.STOPPING: TERMINAL,
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
}


def allowed(old: JobStatus, new: JobStatus) -> bool:
    """True if a job in status ``old`` may move to ``new``."""
    return new in _ALLOWED[old]


class StaleTransition(Exception):
    """The job was not in a status from which the transition is allowed (someone else moved it)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One status change: to RUNNING, to STOPPING with the status to record once stopped, or final."""

    job_id: str
    new: JobStatus
    reason: str | None
    stop_status: JobStatus | None = None
    rc: int | None = None
    # Applied only while the job is still in this status (None: from any status ``allowed`` permits):
    # a verdict drawn from what a RUNNING job's agent said must not override a stop decided meanwhile.
    expect: JobStatus | None = None

    @classmethod
    def running(cls, job_id: str) -> Transition:
        return cls(job_id, JobStatus.RUNNING, "started on agent")

    @classmethod
    def stop(cls, job_id: str, stop_status: JobStatus, reason: str) -> Transition:
        if stop_status not in TERMINAL:
            raise ValueError(f"stop_status must be terminal, not {stop_status}")
        return cls(job_id, JobStatus.STOPPING, reason, stop_status=stop_status)

    @classmethod
    def finish(
        cls,
        job_id: str,
        status: JobStatus,
        rc: int | None,
        reason: str | None,
        *,
        expect: JobStatus | None = None,
    ) -> Transition:
        if status not in TERMINAL:
            raise ValueError(f"finish needs a terminal status, not {status}")
        return cls(job_id, status, reason, rc=rc, expect=expect)

    def values(self, now: datetime) -> dict[str, Any]:
        """Columns set besides status, reason and updated_at."""
        if self.new is JobStatus.STOPPING:
            return {"stop_status": str(self.stop_status), "stop_requested_at": now}
        if self.new in TERMINAL:
            return {"rc": self.rc, "finished_at": now}
        return {}


class OneTransition(ABC):
    """One job's status change at a time, on a store's batch :meth:`apply`: what :class:`RouterDB`
    and the core's simulated router DB (simulation/router.py) share."""

    @abstractmethod
    def apply(self, transitions: Sequence[Transition], *, source: str) -> list[JobRecord | None]: ...

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    def mark_running(self, job_id: str, *, source: str) -> JobRecord:
        return self._apply_one(Transition.running(job_id), source)

    def request_stop(self, job_id: str, *, stop_status: JobStatus, reason: str, source: str) -> JobRecord:
        """Record the stop intent before the agent is called, so that a crash cannot lose it."""
        return self._apply_one(Transition.stop(job_id, stop_status, reason), source)

    def finish(
        self, job_id: str, *, status: JobStatus, rc: int | None, reason: str | None, source: str
    ) -> JobRecord:
        return self._apply_one(Transition.finish(job_id, status, rc, reason), source)

    def _apply_one(self, transition: Transition, source: str) -> JobRecord:
        """The job after ``transition``; KeyError if there is no such job, StaleTransition if it is
        in a status the transition may not follow."""
        (result,) = self.apply([transition], source=source)
        if result is not None:
            return result
        current = self.get(transition.job_id)
        if current is None:
            raise KeyError(transition.job_id)
        raise StaleTransition(f"job {transition.job_id} is {current.status}; cannot become {transition.new}")
