"""How a cycle reads Airflow: one protocol, its reads, and the one place ``[poll] strategy`` is read.

A read answers, for the live jobs of a cycle, the observations that may stop them (a job left out is
unchanged) and says which requests it made. There are three:

- the *targeted* read (``targeted``, the default: :class:`reconciler.core.targeted.TargetedRead`) reads
  only what the active jobs cost;
- the *full* read (:class:`FullRead`) reads every live job's task instance through the batch
  endpoint: every cycle with ``batch``, every ``full_resync_seconds`` with ``incremental``;
- the *changed-since* read (:class:`ChangedSince`) reads every task instance updated since the
  previous read, less ``overlap_seconds``: what ``incremental`` reads between its full reads, and what
  every strategy reads while its main read fails.

:class:`FallbackRead` puts a main read and the changed-since read together and owns what failure
means. Airflow unwell (a 5xx, a timeout) fails the cycle: every job is kept, as uncertainty never
stops one. A main read Airflow refuses (the batch endpoint forbidden, say), or a full read failing
any way, backs off (one poll interval, doubling up to ``full_resync_seconds``; ``batch`` tries again
every cycle) while the changed-since read goes on every cycle; ``/readyz`` says why
(:attr:`FallbackRead.failing`). Nothing read yet, the cycle fails: the changed-since read counts from
there, and the main read, once it works, finds what changed before. Every would-be stop is confirmed
by a direct read (:mod:`reconciler.core.confirmer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from reconciler.airflow.task_instances import REFUSALS, AirflowError, TaskInstancePath, TaskInstanceReader
from reconciler.config import PollConfig
from reconciler.core.decision import Absent, Observation, Stop
from reconciler.core.observe import judge, observe, ti_key
from reconciler.core.targeted import TargetedRead
from reconciler.metrics import Metrics
from router_db import JobRecord

log = logging.getLogger("reconciler.core.reads")

Found = dict[str, Observation]  # job id -> what may stop it


class AirflowRead(Protocol):
    """What the loop asks of Airflow each cycle."""

    async def read(self, live: Sequence[JobRecord]) -> tuple[Found, str]:
        """Observations of the live jobs that may stop them, and which reads ran. Raises
        :class:`AirflowError` when Airflow cannot answer: the cycle keeps every job."""
        ...

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        """Jobs that left the active set since the previous read, as they ended."""
        ...

    def restart(self) -> None:
        """A new term: forget what earlier reads learnt."""
        ...

    @property
    def failing(self) -> str | None:
        """Why the main read keeps failing (None: it works), for ``/readyz``."""
        ...


class MainRead(Protocol):
    """A read :class:`FallbackRead` falls back from."""

    name: str  # in logs: "targeted read", "full read"
    around: str  # the cycle's read while it fails
    backs_off: bool  # False: tried again every cycle however often it fails (batch)

    def due(self) -> bool: ...

    def refused(self, exc: AirflowError) -> bool:
        """Whether the error is one to read around (the changed-since read meanwhile) rather than one
        that fails the cycle."""
        ...

    async def read(self, live: Sequence[JobRecord]) -> tuple[Found, str]: ...

    def ended(self, jobs: Iterable[JobRecord]) -> None: ...

    def missed(self) -> None: ...

    def restart(self) -> None: ...


class Targeted:
    """The targeted read as a main read: due every cycle; a refusal of the batch endpoint is read
    around, anything else fails the cycle (and puts its full check at full speed)."""

    name = "targeted read"
    around = "incremental (targeted read refused)"
    backs_off = True

    def __init__(self, targeted: TargetedRead, metrics: Metrics) -> None:
        self.targeted = targeted
        self._metrics = metrics

    def due(self) -> bool:
        return True

    def refused(self, exc: AirflowError) -> bool:
        return exc.status in REFUSALS

    async def read(self, live: Sequence[JobRecord]) -> tuple[Found, str]:
        found, how = await self.targeted.read(live)
        self._metrics.targeted_surplus.set(self.targeted.surplus)
        return found, how

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        self.targeted.ended(jobs)

    def missed(self) -> None:
        self.targeted.missed()

    def restart(self) -> None:
        self.targeted.restart()


class FullRead:
    """Every live job's task instance through the batch endpoint, every ``every_seconds`` (0: every
    cycle). A job whose task instance is not in the answer is absent (its run or task instance was
    deleted). Any failure is read around."""

    name = "full read"
    around = "incremental (full read failing)"

    def __init__(
        self, airflow: TaskInstanceReader, *, every_seconds: float, clock: Callable[[], float]
    ) -> None:
        self._airflow = airflow
        self._every = every_seconds
        # Every cycle (batch): a failed read is tried again the next, as batch reads everything every
        # cycle; the changed-since read between would miss what a skewed clock hides.
        self.backs_off = every_seconds > 0
        self._clock = clock
        self._next = float("-inf")

    def due(self) -> bool:
        return self._clock() >= self._next

    def refused(self, exc: AirflowError) -> bool:
        return True

    async def read(self, live: Sequence[JobRecord]) -> tuple[Found, str]:
        found = await self._read(live)
        self._next = self._clock() + self._every
        return found, "full"

    async def _read(self, live: Sequence[JobRecord]) -> Found:
        if not live:
            await self._airflow.ping()  # nothing to read, but readiness must mean "Airflow answers"
            return {}
        # Several jobs may share a task-instance key (two tries, or a run deleted and created again):
        # each is checked. Page by page, keeping only what could stop a job: a full read of 100k task
        # instances must not hold them all at once.
        unseen: dict[TaskInstancePath, list[JobRecord]] = {}
        for job in live:
            unseen.setdefault(ti_key(job), []).append(job)
        found: Found = {}
        async for page in self._airflow.task_instance_pages(
            dag_ids={j.key.dag_id for j in live},
            run_ids={j.key.run_id for j in live},
            task_ids={j.key.task_id for j in live},
        ):
            for ti in page:
                for job in unseen.pop(ti.key, ()):
                    if isinstance(judge(job, observe(ti)), Stop):
                        found[job.job_id] = observe(ti)
        found.update((job.job_id, Absent()) for jobs in unseen.values() for job in jobs)
        return found

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        pass  # it reads every live job every time: nothing to let go of

    def missed(self) -> None:
        pass  # its next read reads everything anyway

    def restart(self) -> None:
        self._next = float("-inf")


class ChangedSince:
    """The task instances updated since the previous read (less the overlap), on this process's wall
    clock: Airflow stamps ``updated_at`` with its own, and the overlap covers the difference."""

    def __init__(self, airflow: TaskInstanceReader, *, overlap_seconds: float) -> None:
        self._airflow = airflow
        self._overlap = timedelta(seconds=overlap_seconds)
        self.watermark: datetime | None = None  # start of the last successful read

    async def read(self, live: Sequence[JobRecord], started: datetime) -> Found:
        since = (self.watermark or started) - self._overlap
        changed = {ti.key: ti for ti in await self._airflow.changed_since(since)}
        self.watermark = started
        return {job.job_id: observe(changed[ti_key(job)]) for job in live if ti_key(job) in changed}


class FallbackRead:
    """A main read, and the changed-since read while it fails (see the module's docstring)."""

    def __init__(
        self,
        main: MainRead,
        changes: ChangedSince,
        metrics: Metrics,
        *,
        interval_seconds: float,
        max_backoff_seconds: float,
        clock: Callable[[], float],
        wall: Callable[[], datetime],
    ) -> None:
        self.main = main
        self._changes = changes
        self._metrics = metrics
        self._interval = interval_seconds
        self._max_backoff = max_backoff_seconds
        self._clock, self._wall = clock, wall
        self._retry_at = float("-inf")  # while backing off: when to try the main read again
        self._failures = 0  # consecutive failed main reads
        self._failing: str | None = None

    @property
    def failing(self) -> str | None:
        return self._failing

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        self.main.ended(jobs)

    def restart(self) -> None:
        self._changes.watermark = None
        self._retry_at = float("-inf")
        self.main.restart()

    async def read(self, live: Sequence[JobRecord]) -> tuple[Found, str]:
        started = self._wall()
        backing_off = self._clock() < self._retry_at
        if backing_off or not self.main.due():
            how = self.main.around if backing_off else "incremental"
            return await self._changes.read(live, started), how
        try:
            found, how = await self.main.read(live)
        except AirflowError as exc:
            self.main.missed()
            first = self._changes.watermark is None
            if first:  # nothing read yet: what changes from here on is read next
                self._changes.watermark = started
            if not self.main.refused(exc):
                raise  # Airflow unwell: keep every job, try again next cycle
            self._failed(exc)
            if first:
                raise
            return await self._changes.read(live, started), self.main.around
        self._works_again()
        self._changes.watermark = started
        return found, how

    def _works_again(self) -> None:
        if self._failing is not None:
            log.info("%s of task instances works again", self.main.name, extra={"action": "full_read"})
        self._failures, self._failing = 0, None
        self._metrics.full_resync_failing.set(0)

    def _failed(self, exc: AirflowError) -> None:
        """Back off the main read: one poll interval, doubling up to the cap; the changed-since reads
        go on every cycle meanwhile."""
        self._failures += 1
        delay = min(self._max_backoff, self._interval * 2.0 ** min(self._failures - 1, 20))
        if not self.main.backs_off:
            delay = 0.0
        self._retry_at = self._clock() + delay
        self._failing = str(exc)
        self._metrics.full_resync_failing.set(1)
        log.error(
            "%s of task instances failed (%d in a row, next in %.0f s); incremental reads go on: %s",
            self.main.name,
            self._failures,
            delay,
            exc,
            extra={"action": "full_read", "error": str(exc)},
        )


def reload_seconds(poll: PollConfig) -> float:
    """How often the active jobs are read from the router DB whole (:mod:`.active_jobs`): every cycle
    with ``batch``, which reads everything every cycle, else every ``full_resync_seconds``."""
    return 0.0 if poll.strategy == "batch" else poll.full_resync_seconds


def read_for(
    poll: PollConfig,
    airflow: TaskInstanceReader,
    metrics: Metrics,
    *,
    clock: Callable[[], float],
    wall: Callable[[], datetime],
) -> FallbackRead:
    """The read ``[poll] strategy`` names (this module is the one place it is read)."""
    main: MainRead
    if poll.strategy == "targeted":
        main = Targeted(
            TargetedRead(
                airflow,
                full_check_seconds=poll.full_resync_seconds,
                concurrency=poll.max_concurrent_reads,
                clock=clock,
                on_request=lambda read: metrics.targeted_reads.labels(read).inc(),
            ),
            metrics,
        )
    else:
        every = 0.0 if poll.strategy == "batch" else poll.full_resync_seconds
        main = FullRead(airflow, every_seconds=every, clock=clock)
    return FallbackRead(
        main,
        ChangedSince(airflow, overlap_seconds=poll.overlap_seconds),
        metrics,
        interval_seconds=poll.interval_seconds,
        max_backoff_seconds=poll.full_resync_seconds,
        clock=clock,
        wall=wall,
    )
