"""Which finished jobs' directories the agent removes, so a VM's disk does not fill over the months.

A finished job's directory (its record, supervisor log and output) is kept while someone may still
ask: until ``retain_finished_seconds`` after it ended, and past that only within the count and byte
budgets, oldest removed first. A job whose outcome nobody has read yet (no ``GET`` of it since it
ended: the sidecar may not have recorded its rc) is kept until the much longer
``retain_unread_seconds``, budgets or not. Running jobs are never candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Finished:
    job_id: str
    finished_at: datetime
    read: bool  # its outcome was answered to a GET since it ended
    size: int  # bytes of its directory's files


@dataclass(frozen=True)
class Budget:
    keep_seconds: float  # a read job stays at least this long after it ended
    unread_seconds: float  # an unread one stays until this long after it ended
    max_jobs: int  # finished jobs kept at most (0: no count limit)
    max_bytes: int  # their bytes at most (0: no byte limit)


def to_remove(jobs: Sequence[Finished], budget: Budget, *, now: datetime) -> list[str]:
    """The job ids to remove now, oldest first."""
    gone: set[str] = set()
    for job in jobs:
        age = (now - job.finished_at).total_seconds()
        if age >= budget.unread_seconds or (job.read and age >= budget.keep_seconds):
            gone.add(job.job_id)
    kept = sorted((j for j in jobs if j.job_id not in gone), key=lambda j: (j.finished_at, j.job_id))
    count, size = len(kept), sum(j.size for j in kept)
    for job in kept:  # oldest first, read ones only, until within both budgets
        if (not budget.max_jobs or count <= budget.max_jobs) and (
            not budget.max_bytes or size <= budget.max_bytes
        ):
            break
        if job.read:
            gone.add(job.job_id)
            count, size = count - 1, size - job.size
    order = {j.job_id: (j.finished_at, j.job_id) for j in jobs}
    return sorted(gone, key=order.__getitem__)
