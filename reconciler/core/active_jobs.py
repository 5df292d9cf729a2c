"""The active jobs as the router DB holds them, kept current without reloading them all each cycle.

A cycle needs every queued, running and stopping job. Reloading tens of thousands of rows a cycle
would cost more than reading Airflow, so :class:`ActiveJobs` reloads them every ``reload_seconds``
(the first time, after a new term, and every cycle with ``batch``: :func:`.reads.reload_seconds`) and
otherwise reads the rows changed since its previous read.
Both reads are timed by the router DB's clock, as every replica writes ``updated_at``: this replica's
own clock never enters, and ``overlap_seconds`` covers a writer whose transaction began before the
read and committed after.

The jobs that left the active set since the previous cycle (ended, or gone at a reload) are kept, as
they ended, for the read of Airflow (:meth:`ActiveJobs.left`): the targeted read lets go of the task
instances only they watched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from router_db import JobRecord, RouterDB


class ActiveJobs:
    def __init__(
        self, db: RouterDB, *, reload_seconds: float, overlap_seconds: float, clock: Callable[[], float]
    ) -> None:
        self._db = db
        self._reload_seconds = reload_seconds
        self._overlap = timedelta(seconds=overlap_seconds)
        self._clock = clock
        self._jobs: dict[str, JobRecord] = {}
        self._read_at: datetime | None = None  # router DB time of the previous read's start
        self._next_reload = float("-inf")  # on ``clock``
        self._left: list[JobRecord] = []
        self.read_clock = float("-inf")  # ``clock`` time of the last read that succeeded

    def restart(self) -> None:
        """A new term: what an earlier term read is stale (another replica led meanwhile)."""
        self._jobs, self._read_at, self._next_reload, self._left = {}, None, float("-inf"), []
        self.read_clock = float("-inf")

    def known(self) -> list[JobRecord]:
        """The active jobs as of the last read."""
        return list(self._jobs.values())

    def left(self) -> list[JobRecord]:
        """The jobs that left the active set since this was last asked, as they ended."""
        left, self._left = self._left, []
        return left

    async def current(self) -> list[JobRecord]:
        """The active jobs now: a reload when due, else the previous ones and what changed since."""
        if self._read_at is None or self._clock() >= self._next_reload:
            await self._reload()  # one that fails is tried again next cycle
            self._next_reload = self._clock() + self._reload_seconds
        else:
            read_started, changed = await asyncio.to_thread(
                self._db.changes_since, self._read_at - self._overlap
            )
            for job in changed:
                if job.active:
                    self._jobs[job.job_id] = job
                elif self._jobs.pop(job.job_id, None) is not None:
                    self._left.append(job)
            self._read_at = read_started
        self.read_clock = self._clock()
        return list(self._jobs.values())

    async def _reload(self) -> None:
        read_started = await asyncio.to_thread(self._db.now)
        previous = self._jobs
        self._jobs = {job.job_id: job for job in await asyncio.to_thread(self._db.active)}
        gone = [job_id for job_id in previous if job_id not in self._jobs]
        if gone:  # their records as they ended
            fresh = await asyncio.to_thread(self._db.get_many, gone)
            self._left.extend(fresh.get(job_id, previous[job_id]) for job_id in gone)
        self._read_at = read_started
