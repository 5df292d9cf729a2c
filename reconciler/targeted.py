"""The targeted read: what a cycle asks Airflow costs what the active jobs cost, not Airflow's history.

A job's task instance waits in ``deferred`` while its job runs. Each cycle makes two requests through
the batch endpoint, filtered by the watched jobs' DAG, run and task ids (filters Airflow's indexes
serve, so finished history is never read):

- the watched task instances in an *in-flight* state (no state, scheduled, queued, running, up for
  retry or reschedule, restarting): a steady cycle returns none; a cleared task shows here;
- the *count* of watched task instances in ``deferred``, without rows.

Every watched task instance not in flight should be deferred. A count below that number means some
left ``deferred`` for a finished state (marked failed or success, skipped) or vanished (run deleted);
the read then *locates* them: counts over smaller groups of runs, down to groups small enough to read
row by row. The count errs only one way: task instances the ids' cross product also matches (a task
not watched in a watched run) can hide a drop, never fake one. So a rolling *full check* reads every
watched run's rows once per ``full_resync_seconds``, a few hundred rows at a time.

A job that ended on its own (the command exited) leaves its task instance deferred until the trigger
hears of the end. Where the live jobs' id lists still match that task instance (another map index of
the task, the same task in another watched run) it stays watched until Airflow moves it on, so that
it neither hides a drop while it is deferred nor fakes one when it leaves. Every would-be stop is
still confirmed by a direct read in the loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from reconciler.airflow import TaskInstance, TaskInstancePath, TaskInstanceReader
from reconciler.decision import Absent, Decision, Observation, Observed, Stop, decide
from router_db import JobRecord

IN_FLIGHT_STATES: tuple[str | None, ...] = (
    None,
    "scheduled",
    "queued",
    "running",
    "up_for_retry",
    "up_for_reschedule",
    "restarting",
)
DEFERRED_STATES: tuple[str | None, ...] = ("deferred",)
FANOUT = 8  # a located group is split into this many, counted at once
LEAF_KEYS = 200  # a group with this few task instances is read row by row instead of split
CHECK_KEYS = 1000  # task instances per request of the rolling full check (one batch page)
DRAIN_SECONDS = 60.0  # how long a job that ended on its own stays watched for its deferred TI

Run = tuple[str, str]  # (dag_id, run_id)
T = TypeVar("T")


def ti_key(job: JobRecord) -> TaskInstancePath:
    key = job.key
    return TaskInstancePath(
        dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
    )


def observe(ti: TaskInstance | None) -> Observation:
    return Absent() if ti is None else Observed(ti.state, ti.try_number, ti.identity)


def judge(job: JobRecord, observation: Observation) -> Decision:
    """The decision table for this job (its try and its task instance's identity)."""
    return decide(job.key.try_number, observation, job_identity=job.ti_identity)


def run_of(key: TaskInstancePath) -> Run:
    return (key.dag_id, key.run_id)


def split(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """``items`` in at most ``parts`` contiguous slices of near-equal size."""
    size = math.ceil(len(items) / parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class Watched:
    """One cycle's watched task instances, by run: the live jobs' and the draining ones'."""

    jobs: dict[TaskInstancePath, list[JobRecord]] = field(default_factory=dict)
    by_run: dict[Run, set[TaskInstancePath]] = field(default_factory=dict)

    def add(self, key: TaskInstancePath, job: JobRecord | None = None) -> None:
        jobs = self.jobs.setdefault(key, [])
        if job is not None:
            jobs.append(job)
        self.by_run.setdefault(run_of(key), set()).add(key)

    def keys(self, runs: Iterable[Run]) -> list[TaskInstancePath]:
        return [key for run in runs for key in self.by_run[run]]


def filters(keys: Collection[TaskInstancePath]) -> dict[str, set[str]]:
    """The batch endpoint's id lists that match ``keys`` (and whatever else their cross product does)."""
    return {
        "dag_ids": {k.dag_id for k in keys},
        "run_ids": {k.run_id for k in keys},
        "task_ids": {k.task_id for k in keys},
    }


class TargetedRead:
    """The targeted read's state across cycles: draining task instances and the rolling full check."""

    def __init__(
        self,
        airflow: TaskInstanceReader,
        *,
        full_check_seconds: float,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
        on_request: Callable[[str], None] = lambda read: None,
    ) -> None:
        self._airflow = airflow
        self._on_request = on_request  # metrics hook: called with the purpose of each request
        self._full_check_seconds = full_check_seconds
        self._concurrency = concurrency
        self._clock = clock
        self._draining: dict[TaskInstancePath, float] = {}  # key -> when it stops being watched
        self._deferred: set[str] = set()  # live jobs whose task instance the last read took as deferred
        self._round: list[Run] = []  # runs the current round of the full check has yet to read
        self._next_check = float("-inf")
        self.requests: dict[str, int] = {"in_flight": 0, "deferred_count": 0, "locate_count": 0, "rows": 0}

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        """Jobs that left the active set. One that ended on its own while its task instance was
        deferred keeps that task instance watched until Airflow moves it on (or DRAIN_SECONDS)."""
        for job in jobs:
            if job.job_id in self._deferred and job.stop_requested_at is None:
                self._draining[ti_key(job)] = self._clock() + DRAIN_SECONDS
            self._deferred.discard(job.job_id)

    async def read(self, live: Sequence[JobRecord]) -> tuple[dict[str, Observation], str]:
        """Observations of the live jobs that this cycle's reads say may diverge, and which reads ran."""
        now = self._clock()
        self._draining = {key: until for key, until in self._draining.items() if until > now}
        watched = Watched()
        for job in live:
            watched.add(ti_key(job), job)
        ids = filters(watched.jobs)
        for key in self._draining:
            # Only a draining task instance the live jobs' id lists match is in the count.
            if (
                key.dag_id in ids["dag_ids"]
                and key.run_id in ids["run_ids"]
                and key.task_id in ids["task_ids"]
            ):
                watched.add(key)
        if not watched.jobs:
            await self._airflow.ping()  # nothing to read, but readiness must mean "Airflow answers"
            return {}, "targeted"
        every = list(watched.jobs)
        in_flight, deferred = await asyncio.gather(
            self._rows(every, IN_FLIGHT_STATES, kind="in_flight"),
            self._count(every, DEFERRED_STATES, kind="deferred_count"),
        )
        found: dict[str, Observation] = {}
        self._observe(watched, in_flight, found, absent_means_gone=False)
        expected = [key for key in every if key not in in_flight]
        self._deferred = {job.job_id for key in expected for job in watched.jobs[key]}
        read = "targeted"
        if deferred < len(expected):
            read += "+locate"
            by_run: dict[Run, list[TaskInstancePath]] = {}
            for key in expected:
                by_run.setdefault(run_of(key), []).append(key)
            await self._locate(watched, sorted(by_run), by_run, found)
        due = self._due(watched, now)
        if due:
            read += "+check"
            await self._check(watched, due, found)
        return found, read

    async def _locate(
        self,
        watched: Watched,
        runs: Sequence[Run],
        expected: dict[Run, list[TaskInstancePath]],
        found: dict[str, Observation],
    ) -> None:
        """Find which of ``runs`` hold a watched task instance no longer deferred."""
        keys = [key for run in runs for key in expected[run]]
        if len(keys) <= LEAF_KEYS or len(runs) == 1:
            await self._check(watched, runs, found)
            return
        groups = split(runs, FANOUT)
        counts = await self._bounded(
            [
                self._count([k for run in g for k in expected[run]], DEFERRED_STATES, kind="locate_count")
                for g in groups
            ]
        )
        short = [g for g, n in zip(groups, counts, strict=True) if n < sum(len(expected[r]) for r in g)]
        await asyncio.gather(*(self._locate(watched, g, expected, found) for g in short))

    async def _check(self, watched: Watched, runs: Sequence[Run], found: dict[str, Observation]) -> None:
        """Read the rows of every watched task instance in ``runs`` (any state), a page at a time."""
        groups: list[Sequence[Run]] = []
        group: list[Run] = []
        size = 0
        for run in runs:
            group.append(run)
            size += len(watched.by_run[run])
            if size >= CHECK_KEYS:
                groups.append(group)
                group, size = [], 0
        if group:
            groups.append(group)
        answers = await self._bounded([self._rows(watched.keys(g), None, kind="rows") for g in groups])
        for answer in answers:
            self._observe(watched, answer, found, absent_means_gone=True)

    def _observe(
        self,
        watched: Watched,
        rows: dict[TaskInstancePath, TaskInstance | None],
        found: dict[str, Observation],
        *,
        absent_means_gone: bool,
    ) -> None:
        for key, ti in rows.items():
            if ti is None and not absent_means_gone:
                continue
            if ti is None or ti.state != "deferred":
                self._draining.pop(key, None)  # Airflow moved it on: no longer expected deferred
            for job in watched.jobs.get(key, ()):
                observation = observe(ti)
                if isinstance(judge(job, observation), Stop):
                    found[job.job_id] = observation

    def _due(self, watched: Watched, now: float) -> list[Run]:
        """The runs the rolling full check reads this cycle: about CHECK_KEYS task instances, often
        enough that every watched run is read once per ``full_check_seconds``."""
        if now < self._next_check:
            return []
        if not self._round:
            self._round = sorted(watched.by_run, reverse=True)  # popped from the end: in order
        due: list[Run] = []
        size = 0
        while self._round and size < CHECK_KEYS:
            run = self._round.pop()
            if run in watched.by_run:
                due.append(run)
                size += len(watched.by_run[run])
        requests = max(1, math.ceil(len(watched.jobs) / CHECK_KEYS))
        self._next_check = now + self._full_check_seconds / requests
        return due

    async def _rows(
        self, keys: Collection[TaskInstancePath], states: Sequence[str | None] | None, *, kind: str
    ) -> dict[TaskInstancePath, TaskInstance | None]:
        """The task instances of ``keys`` that the batch endpoint returns; with ``states`` None, every
        key not returned maps to None (absent)."""
        wanted = set(keys)
        rows: dict[TaskInstancePath, TaskInstance | None] = (
            {} if states is not None else dict.fromkeys(wanted)
        )
        self.requests[kind] += 1
        self._on_request(kind)
        async for page in self._airflow.task_instance_pages(**filters(wanted), states=states):
            for ti in page:
                if ti.key in wanted:
                    rows[ti.key] = ti
        return rows

    async def _count(
        self, keys: Collection[TaskInstancePath], states: Sequence[str | None], *, kind: str
    ) -> int:
        self.requests[kind] += 1
        self._on_request(kind)
        return await self._airflow.count_task_instances(**filters(keys), states=states)

    async def _bounded(self, calls: Sequence[Awaitable[T]]) -> list[T]:
        gate = asyncio.Semaphore(self._concurrency)

        async def one(call: Awaitable[T]) -> T:
            async with gate:
                return await call

        return list(await asyncio.gather(*(one(c) for c in calls)))
