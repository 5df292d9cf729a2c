"""Long-polls of ``GET /jobs/{id}?wait=N``: waiters on a job wake as soon as its record changes.

One asyncio future per watched job, however many requests wait on it: a change wakes them all at once
and each checks its own condition. Changes come two ways:

- :meth:`JobWatch.notify`, called with the records a change in this process produced (an agent's
  report of an exit, the rolling sweep): the waiters answer at once;
- one read every ``period`` seconds of the jobs changed since the previous read (along the router
  DB's index on ``updated_at``: its cost follows the changes, not the waiters, and never one query
  per waiter), for changes made elsewhere: another replica (the leader runs the loop, a standby
  serves the API too), or a writer here that does not notify (the stop dispatcher). A job's
  ``updated_at`` is the router DB's time, whichever replica wrote it, and so is the moment each read
  starts from (:meth:`RouterDB.changes_since`): replicas' own clocks never enter. Each read starts
  :data:`OVERLAP_SECONDS` before the previous one began, for a writer whose transaction took its time
  before that read and committed after it; a change missed even so is seen by the waiter's next
  request, when its wait runs out.

The batched read runs only while someone waits. :meth:`JobWatch.close` (the server's shutdown) wakes
every waiter with the job as last seen, so a graceful shutdown never waits out a long-poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from router_db import JobRecord, RouterDB

log = logging.getLogger(__name__)

WATCH_PERIOD_SECONDS = 0.5  # [poll] watch_seconds' default
OVERLAP_SECONDS = 2.0  # each read of changes goes back this far (router DB time) before the previous one


def _newer(record: JobRecord, than: JobRecord) -> bool:
    """``record`` is a later state of the job than ``than`` (a read that started before a change
    this process made may come back after it: the older record must not replace the newer)."""
    if record.updated_at != than.updated_at:
        return record.updated_at > than.updated_at
    return record.status is not than.status


@dataclass
class _Watched:
    latest: JobRecord
    changed: asyncio.Future[JobRecord]
    waiters: int = 0


@dataclass
class JobWatch:
    db: RouterDB
    period: float = WATCH_PERIOD_SECONDS
    _jobs: dict[str, _Watched] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None
    _read_from: datetime | None = None  # when the previous read of changes began (router DB time)
    _closed: bool = False

    @property
    def watched(self) -> int:
        """Jobs someone waits on now."""
        return len(self._jobs)

    async def wait(self, job: JobRecord, done: Callable[[JobRecord], bool], timeout: float) -> JobRecord:
        """The job's record once ``done(record)`` holds, or the latest seen when ``timeout`` seconds
        pass (or the watch closes) first."""
        if done(job) or self._closed or timeout <= 0:
            return job
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watched = self._jobs.get(job.job_id)
        if watched is None:
            watched = self._jobs[job.job_id] = _Watched(job, loop.create_future())
        elif _newer(job, watched.latest):
            watched.latest = job
        watched.waiters += 1
        self._start_reader()
        try:
            latest = watched.latest
            while not done(latest) and not self._closed:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    # Shielded: one waiter's timeout must not cancel the future the others wait on.
                    latest = await asyncio.wait_for(asyncio.shield(watched.changed), left)
                except TimeoutError:
                    break
            return watched.latest if not done(latest) else latest
        finally:
            watched.waiters -= 1
            if watched.waiters == 0 and self._jobs.get(job.job_id) is watched:
                del self._jobs[job.job_id]

    def notify(self, records: Iterable[JobRecord]) -> int:
        """Records as they are now (after a change): wake the waiters of each that changed. Returns
        how many watched jobs changed."""
        woken = 0
        for record in records:
            watched = self._jobs.get(record.job_id)
            if watched is None or not _newer(record, watched.latest):
                continue
            watched.latest = record
            watched.changed.set_result(record)
            watched.changed = asyncio.get_running_loop().create_future()
            woken += 1
        return woken

    def close(self) -> None:
        """Wake every waiter with what it has (the server is shutting down); later waits answer at
        once."""
        self._closed = True
        for watched in self._jobs.values():
            if not watched.changed.done():
                watched.changed.set_result(watched.latest)
        if self._reader is not None:
            self._reader.cancel()

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_periodically(), name="job-watch")

    async def _read_periodically(self) -> None:
        """One read of the changed jobs each period while any job is watched."""
        failing = False
        try:
            self._read_from = await asyncio.to_thread(self.db.now)  # a waiter's read of its job came before
        except Exception:  # the router DB is down: the first read that works starts from its own time
            self._read_from = None
        while self._jobs and not self._closed:
            await asyncio.sleep(self.period)
            since = self._read_from - timedelta(seconds=OVERLAP_SECONDS) if self._read_from else None
            try:
                started, changed = await asyncio.to_thread(self.db.changes_since, since)
            except Exception as exc:  # the router DB is down: waiters time out with what they have
                if not failing:
                    log.warning("long-poll read failed: %s", type(exc).__name__, extra={"error": str(exc)})
                failing = True
                continue
            failing = False
            self._read_from = started
            self.notify(job for job in changed if job.job_id in self._jobs)
