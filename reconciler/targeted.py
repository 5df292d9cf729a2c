"""The targeted read: what a cycle asks Airflow costs what the active jobs cost, not Airflow's history.

A job's task instance waits in ``deferred`` while its job runs. Each cycle makes two requests through
the batch endpoint, filtered by the watched jobs' DAG, run and task ids (filters Airflow's indexes
serve, so finished history is never read):

- the watched task instances in an *in-flight* state (no state, scheduled, queued, running, up for
  retry or reschedule, restarting): a steady cycle returns none; a cleared task shows here;
- the *count* of watched task instances in ``deferred``, without rows.

Every watched task instance not in flight should be deferred. A count below that number means some
left ``deferred`` for a finished state (marked failed or success, skipped) or vanished (run deleted);
the read then *locates* them: it counts smaller groups of runs at once, down to groups of a few runs
(or while the drop is so dense that most runs hold part of it), and reads the finished task
instances of the groups that fell short, and every row of a group where some vanished. The count
errs only one way: task instances the ids' cross product also matches (a task not watched in a
watched run) can hide a drop, never fake one. So a rolling *full check* reads every watched run's
rows once per ``full_resync_seconds``, a thousand task instances per request.

A job that ended on its own (the command exited) leaves its task instance deferred until the trigger
hears of the end. Where the live jobs' id lists still match that task instance (another map index of
the task, the same task in another watched run) it stays watched until Airflow moves it on, so that
it neither hides a drop while it is deferred nor fakes one when it leaves. Every would-be stop is
still confirmed by a direct read in the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

from reconciler.airflow import AirflowError, TaskInstance, TaskInstancePath, TaskInstanceReader
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
FINISHED_STATES: tuple[str | None, ...] = ("success", "failed", "upstream_failed", "skipped", "removed")
FANOUT = 8  # a located group is split into this many, counted at once
LEAF_KEYS = 200  # a group with this few task instances is read (its finished rows), not split
CHECK_KEYS = 1000  # task instances per request of the rolling full check (one batch page)
# Such requests in flight at once: a thousand rows cost Airflow's API server ~0.65 s to serialize
# (bench/RESULTS.md), and a whole round on a term's first cycle must not take all its workers.
CHECK_PAGES = 2
DRAIN_SECONDS = 60.0  # how long a job that ended on its own stays watched for its deferred TI

Run = tuple[str, str]  # (dag_id, run_id)
log = logging.getLogger("reconciler.targeted")
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


class Watched:
    """The watched task instances by key and by run, kept across cycles and updated by the jobs that
    come and go (a cycle of 100,000 jobs must not rebuild it), plus this cycle's lingering keys."""

    def __init__(self) -> None:
        self.by_id: dict[str, JobRecord] = {}
        self.jobs: dict[TaskInstancePath, list[JobRecord]] = {}
        self.by_run: dict[Run, set[TaskInstancePath]] = {}
        # Task instances of jobs that ended on their own, still deferred as far as we know, that the
        # id lists match: counted as deferred this cycle.
        self.lingering: dict[Run, set[TaskInstancePath]] = {}
        # How many watched keys use each DAG, run and task id: the id lists of the whole set.
        self._ids: tuple[Counter[str], Counter[str], Counter[str]] = (Counter(), Counter(), Counter())

    def update(self, live: Sequence[JobRecord]) -> None:
        current = {job.job_id: job for job in live}
        for job_id in self.by_id.keys() - current.keys():
            self._remove(self.by_id.pop(job_id))
        for job_id in current.keys() - self.by_id.keys():
            self.by_id[job_id] = current[job_id]
            self._add(current[job_id])

    def _add(self, job: JobRecord) -> None:
        key = ti_key(job)
        jobs = self.jobs.get(key)
        if jobs is None:
            self.jobs[key] = jobs = []
            self.by_run.setdefault(run_of(key), set()).add(key)
            for count, name in zip(self._ids, (key.dag_id, key.run_id, key.task_id), strict=True):
                count[name] += 1
        jobs.append(job)

    def _remove(self, job: JobRecord) -> None:
        key = ti_key(job)
        jobs = self.jobs[key]
        jobs.remove(job)
        if jobs:
            return
        del self.jobs[key]
        run = self.by_run[run_of(key)]
        run.discard(key)
        if not run:
            del self.by_run[run_of(key)]
        for count, name in zip(self._ids, (key.dag_id, key.run_id, key.task_id), strict=True):
            count[name] -= 1
            if not count[name]:
                del count[name]

    def covers(self, key: TaskInstancePath) -> bool:
        """Whether the whole set's id lists match ``key``."""
        dags, runs, tasks = self._ids
        return key.dag_id in dags and key.run_id in runs and key.task_id in tasks

    def id_lists(self) -> IdLists:
        dags, runs, tasks = self._ids
        return {"dag_ids": dags.keys(), "run_ids": runs.keys(), "task_ids": tasks.keys()}

    def watches(self, key: TaskInstancePath) -> bool:
        return key in self.jobs or key in self.lingering.get(run_of(key), ())

    def size(self) -> int:
        return len(self.jobs) + sum(map(len, self.lingering.values()))

    def keys(self, runs: Iterable[Run]) -> list[TaskInstancePath]:
        return [key for run in runs for keys in (self.by_run, self.lingering) for key in keys.get(run, ())]

    def runs(self) -> set[Run]:
        return self.by_run.keys() | self.lingering.keys()


IdLists = dict[str, Collection[str]]


def id_lists(keys: Collection[TaskInstancePath]) -> IdLists:
    """The batch endpoint's id lists that match ``keys`` (and whatever else their cross product does)."""
    return {
        "dag_ids": {k.dag_id for k in keys},
        "run_ids": {k.run_id for k in keys},
        "task_ids": {k.task_id for k in keys},
    }


def expected_within(expected: Mapping[Run, list[TaskInstancePath]], ids: IdLists) -> int:
    """How many of ``expected`` the id lists' cross product matches: a group's count takes in the
    task instances of other groups whose DAG, run and task ids it shares (DAGs on one schedule have
    the same run ids), so those are expected in it too."""
    tasks = ids["task_ids"]
    return sum(
        sum(key.task_id in tasks for key in expected.get((dag_id, run_id), ()))
        for dag_id in ids["dag_ids"]
        for run_id in ids["run_ids"]
    )


class TargetedRead:
    """The targeted read's state across cycles: the watched index, the task instances of jobs that
    ended on their own, and the rolling full check."""

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
        self._concurrency = concurrency  # requests in flight at once, whatever the read
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._clock = clock
        self.requests: dict[str, int] = {"in_flight": 0, "deferred_count": 0, "locate_count": 0, "rows": 0}
        self.surplus = 0  # deferred task instances the last count found beyond the watched ones
        self.restart()

    def restart(self) -> None:
        """Forget what earlier reads learnt (a new leadership term): the full check starts over, at
        full speed for its first round."""
        self._watched = Watched()
        self._ended_deferred: dict[TaskInstancePath, float] = {}  # key -> when to stop counting it
        self._in_flight: set[TaskInstancePath] = set()  # what the last read found in flight
        self._round: list[Run] = []  # runs the current round of the full check has yet to read
        self._round_seen: set[Run] = set()  # every run the current round took in
        self._first_round = True  # a term's first round of the full check goes at full speed
        self._next_check = float("-inf")

    @property
    def first_round_done(self) -> bool:
        """Whether the full check's first round of this term has read every run."""
        return not self._first_round

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        """Jobs that left the active set. One that ended on its own while its task instance was
        deferred keeps that task instance counted until Airflow moves it on (or DRAIN_SECONDS)."""
        for job in jobs:
            key = ti_key(job)
            taken_as_deferred = job.job_id in self._watched.by_id and key not in self._in_flight
            if taken_as_deferred and job.stop_requested_at is None:
                self._ended_deferred[key] = self._clock() + DRAIN_SECONDS

    async def read(self, live: Sequence[JobRecord]) -> tuple[dict[str, Observation], str]:
        """Observations of the live jobs that this cycle's reads say may diverge, and which reads ran.

        The in-flight read and the count raise :class:`AirflowError`; a locating or checking read that
        fails is logged and tried again next cycle, and what the other reads found still counts.
        """
        now = self._clock()
        watched = self._watched
        watched.update(live)
        self._ended_deferred = {k: until for k, until in self._ended_deferred.items() if until > now}
        watched.lingering = {}
        for key in self._ended_deferred:
            # Only a task instance the live jobs' id lists match is in the count.
            if key not in watched.jobs and watched.covers(key):
                watched.lingering.setdefault(run_of(key), set()).add(key)
        if not watched.jobs:
            self.surplus = 0
            await self._airflow.ping()  # nothing to read, but readiness must mean "Airflow answers"
            return {}, "targeted"
        ids = watched.id_lists()
        in_flight, deferred = await asyncio.gather(
            self._rows(ids, watched.watches, IN_FLIGHT_STATES, kind="in_flight"),
            self._counted(ids, DEFERRED_STATES, kind="deferred_count"),
        )
        self._in_flight = set(in_flight)
        found: dict[str, Observation] = {}
        failed: list[AirflowError] = []
        self._observe(watched, in_flight, found)
        read = "targeted"
        deficit = watched.size() - len(in_flight) - deferred
        self.surplus = max(0, -deficit)
        if deficit > 0:
            read += "+locate"
            expected: dict[Run, list[TaskInstancePath]] = {}
            for run in watched.runs():
                keys = [key for key in watched.keys([run]) if key not in in_flight]
                if keys:
                    expected[run] = keys
            await self._locate(watched, sorted(expected), expected, deficit, found, failed)
        due = self._due(watched, now)
        if due:
            read += "+check"
            await self._check(watched, due, found, failed, requeue=True)
        if failed:
            read += f" ({len(failed)} failed)"
            log.warning(
                "%d targeted reads failed, tried again next cycle: %s",
                len(failed),
                failed[0],
                extra={"action": "targeted_read", "error": str(failed[0])},
            )
        return found, read

    async def _locate(
        self,
        watched: Watched,
        runs: Sequence[Run],
        expected: dict[Run, list[TaskInstancePath]],
        deficit: int,
        found: dict[str, Observation],
        failed: list[AirflowError],
    ) -> None:
        """Find which of ``runs`` (whose count fell ``deficit`` short) hold watched task instances no
        longer deferred: split them and count each part until the parts are small, or the drop so
        dense that most runs hold one; then read the finished task instances there."""
        keys = [key for run in runs for key in expected[run]]
        if len(keys) <= LEAF_KEYS or len(runs) == 1 or deficit * FANOUT >= len(runs):
            await self._finished(watched, runs, keys, deficit, found, failed)
            return
        groups = split(runs, FANOUT)
        lists = [id_lists([key for run in group for key in expected[run]]) for group in groups]
        try:
            counts = await asyncio.gather(
                *(self._counted(ids, DEFERRED_STATES, kind="locate_count") for ids in lists)
            )
        except AirflowError as exc:
            failed.append(exc)
            return
        short = [expected_within(expected, ids) - n for ids, n in zip(lists, counts, strict=True)]
        await asyncio.gather(
            *(
                self._locate(watched, group, expected, lacking, found, failed)
                for group, lacking in zip(groups, short, strict=True)
                if lacking > 0
            )
        )

    async def _finished(
        self,
        watched: Watched,
        runs: Sequence[Run],
        keys: Collection[TaskInstancePath],
        deficit: int,
        found: dict[str, Observation],
        failed: list[AirflowError],
    ) -> None:
        """The finished task instances the group's id lists match (marked failed or success,
        skipped). If they do not make up the deficit, some vanished (a deleted run): every row of
        these runs is read then."""
        try:
            rows = await self._rows(id_lists(keys), watched.watches, FINISHED_STATES, kind="rows")
        except AirflowError as exc:
            failed.append(exc)
            return
        self._observe(watched, rows, found)
        if len(rows) < deficit:
            await self._check(watched, runs, found, failed)

    async def _check(
        self,
        watched: Watched,
        runs: Sequence[Run],
        found: dict[str, Observation],
        failed: list[AirflowError],
        *,
        requeue: bool = False,
    ) -> None:
        """Read every watched task instance of ``runs`` (any state), about CHECK_KEYS a request; a
        watched key Airflow does not return is absent. With ``requeue``, the runs of a request that
        fails go back into the full check's round."""
        groups: list[tuple[list[Run], list[TaskInstancePath]]] = [([], [])]
        for run in runs:
            if len(groups[-1][1]) >= CHECK_KEYS:
                groups.append(([], []))
            groups[-1][0].append(run)
            groups[-1][1].extend(watched.keys([run]))

        pages = asyncio.Semaphore(CHECK_PAGES)

        async def one(group: list[Run], keys: list[TaskInstancePath]) -> None:
            try:
                async with pages:
                    answer = await self._rows(id_lists(keys), set(keys).__contains__, None, kind="rows")
            except AirflowError as exc:
                failed.append(exc)
                if requeue:
                    self._round.extend(group)
                return
            self._observe(watched, {key: answer.get(key) for key in keys}, found)

        await asyncio.gather(*(one(group, keys) for group, keys in groups if keys))

    def _observe(
        self,
        watched: Watched,
        rows: Mapping[TaskInstancePath, TaskInstance | None],
        found: dict[str, Observation],
    ) -> None:
        for key, ti in rows.items():
            if ti is None or ti.state != "deferred":
                self._ended_deferred.pop(key, None)  # Airflow moved it on: no longer counted
            for job in watched.jobs.get(key, ()):
                observation = observe(ti)
                if isinstance(judge(job, observation), Stop):
                    found[job.job_id] = observation

    def _due(self, watched: Watched, now: float) -> list[Run]:
        """The runs the rolling full check reads this cycle: about CHECK_KEYS task instances at a
        time, often enough that each run is read once per ``full_check_seconds`` (runs that appear
        meanwhile join the current round). A term's first round reads CHECK_PAGES times as much every
        cycle, so what happened while no replica watched is found within seconds, without holding up
        any cycle's own reads."""
        requests = max(1, math.ceil(len(watched.jobs) / CHECK_KEYS))
        if not self._first_round and now < self._next_check:
            return []
        if not self._round:
            if self._first_round and self._round_seen:  # the term's first round is done
                self._first_round = False
                self._next_check = now + self._full_check_seconds / requests
                return []
            self._round = sorted(watched.by_run, reverse=True)  # popped from the end: in order
            self._round_seen = set(self._round)
        else:
            joined = watched.by_run.keys() - self._round_seen
            self._round.extend(sorted(joined, reverse=True))
            self._round_seen |= joined
        due: list[Run] = []
        size, budget = 0, CHECK_KEYS * (CHECK_PAGES if self._first_round else 1)
        while self._round and size < budget:
            run = self._round.pop()
            if run in watched.by_run:
                due.append(run)
                size += len(watched.by_run[run])
        if not self._first_round:
            self._next_check = now + self._full_check_seconds / requests
        return due

    def _slot(self) -> asyncio.Semaphore:
        """The semaphore that bounds this read's requests in flight (one per event loop)."""
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Semaphore(self._concurrency))
        return self._gate[1]

    async def _rows(
        self,
        ids: IdLists,
        wanted: Callable[[TaskInstancePath], bool],
        states: Sequence[str | None] | None,
        *,
        kind: str,
    ) -> dict[TaskInstancePath, TaskInstance]:
        """The task instances the batch endpoint returns for these id lists and states, of the keys
        ``wanted`` (the lists' cross product may match others)."""
        rows: dict[TaskInstancePath, TaskInstance] = {}
        async with self._slot():
            self.requests[kind] += 1
            self._on_request(kind)
            async for page in self._airflow.task_instance_pages(**ids, states=states):
                for ti in page:
                    if wanted(ti.key):
                        rows[ti.key] = ti
        return rows

    async def _counted(self, ids: IdLists, states: Sequence[str | None], *, kind: str) -> int:
        async with self._slot():
            self.requests[kind] += 1
            self._on_request(kind)
            return await self._airflow.count_task_instances(**ids, states=states)
