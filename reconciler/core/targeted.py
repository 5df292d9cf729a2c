"""The targeted read: what a cycle asks Airflow costs what the active jobs cost, not Airflow's history.

A job's task instance waits in ``deferred`` while its job runs. A steady cycle makes two requests
through the batch endpoint, filtered by the watched jobs' DAG, run and task ids (filters Airflow's
indexes serve, so finished history is never read):

- the task instances in an *in-flight* state (no state, scheduled, queued, running, up for retry or
  reschedule, restarting): a steady cycle returns none of the watched ones; a cleared task shows here;
- the *count* of task instances in ``deferred``, without rows.

The id lists match more than the watched task instances (their cross product takes in tasks no job
watches, and the endpoint cannot filter by map index), so the count is compared with every task
instance the read *knows* to be deferred: the watched ones not in flight, and others it has reason
to: the task instance of a job that ended, until Airflow moves it on (a short job ends before its
operator defers: expected from when it leaves flight); one nobody watches that a read saw in flight
and then no longer (a sensor, another sidecar's job); any deferred one a read found.

A difference either way is located at once. The likely reason first, in one request: below the
count, what left flight expected to defer and finished instead; above, what the in-flight read found
that deferred before the count (the two run at once). What is left: the id lists are cut into parts
whose cross products partition theirs (by DAG, then run, then task), each part is counted, and the
parts whose count differs are cut again, down to a few hundred task instances; there the finished
rows are read (a drop: marked failed or success, skipped) or, where the count is above what the read
knows, the deferred rows (what it did not know is known from then on). A watched task instance found
in neither vanished (its run deleted): every row of its run is read. So no deferred task instance the
read does not watch hides a drop for long: once counted, it is known, and known ones are expected.

Where a new job widens the id lists (a new DAG, run or task id), the deferred rows of what they newly
cover are read before the count, so a task instance that deferred there unseen is known before it is
counted.

What a count cannot see is two changes that cancel: a task instance no read saw in flight or deferred
defers as a known one leaves. That drop shows when the task instance leaves ``deferred`` again, or
at the rolling *full check*, which reads every watched run's rows once per ``full_resync_seconds``, a
thousand task instances per request. A read that fails (Airflow unreachable: anything may have come
and gone meanwhile) puts the full check at full speed until it has read every run again. Every
would-be stop is still confirmed by a direct read in the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from reconciler.airflow.task_instances import AirflowError, TaskInstance, TaskInstancePath, TaskInstanceReader
from reconciler.core.decision import Observation, Stop
from reconciler.core.observe import judge, observe, ti_key
from reconciler.core.watched import IdLists, Region, Run, Watched, id_lists, partition, run_of
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
FANOUT = 8  # a located region is cut into this many, counted at once
LEAF_KEYS = 200  # a region with this few expected task instances is read, not cut
CHECK_KEYS = 1000  # task instances per request of the rolling full check (one batch page)
# Such requests in flight at once: a thousand rows cost Airflow's API server ~0.65 s to serialize
# (bench/RESULTS.md), and a whole round on a term's first cycle must not take all its workers.
CHECK_PAGES = 2
DRAIN_SECONDS = 60.0  # how long the task instance of a job that ended stays expected deferred
FOUND = math.inf  # a deferred task instance a read found stays expected until Airflow moves it on

log = logging.getLogger("reconciler.core.targeted")
T = TypeVar("T")


@dataclass
class _Cycle:
    """One read's working state, shared by the reads that account for its count: what it watches, the
    jobs found to stop, and the requests that failed (each tried again next cycle)."""

    watched: Watched
    found: dict[str, Observation] = field(default_factory=dict)
    failed: list[AirflowError] = field(default_factory=list)


class TargetedRead:
    """The targeted read's state across cycles: the watched index, the other task instances known to
    be deferred, and the rolling full check."""

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
        # Task instances by which the last count differed from what the read knew and that no read
        # of that cycle accounted for (a locating read failed): as many drops wait a cycle more.
        self.surplus = 0
        self.restart()

    def restart(self) -> None:
        """Forget what earlier reads learnt (a new leadership term): the full check starts over, at
        full speed for its first round."""
        self._watched = Watched()
        # Task instances not watched, expected deferred: key -> until when (FOUND: while it is).
        self._others: dict[TaskInstancePath, float] = {}
        self._ahead: set[TaskInstancePath] = set()  # of those, the ones still to defer
        # Task instances not watched that the last read found in flight -> whether they may defer
        # next (False: they have deferred already and are finishing).
        self._passing: dict[TaskInstancePath, bool] = {}
        self._in_flight: set[TaskInstancePath] = set()  # watched ones the last read found in flight
        self._round: list[Run] = []  # runs the current round of the full check has yet to read
        self._round_seen: set[Run] = set()  # every run the current round took in
        self._first_round = True  # a term's first round of the full check goes at full speed
        # The id lists (DAGs, runs, tasks) of the last read: what a read's lists newly cover is new.
        self._ids_read: tuple[frozenset[str], frozenset[str], frozenset[str]] | None = None
        self._next_check = float("-inf")

    @property
    def first_round_done(self) -> bool:
        """Whether the full check's round at full speed (a term's first, or one after a failed read)
        has read every run."""
        return not self._first_round

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        """Jobs that left the active set. One that ended on its own keeps its task instance expected
        deferred until Airflow moves it on (or DRAIN_SECONDS): at once if a read took it for
        deferred, from when it leaves flight if no read has found it out of flight yet (its
        operator defers after the job started, so a short job can end first)."""
        watched = self._watched
        for job in jobs:
            if job.job_id not in watched.by_id or job.stop_requested_at is not None:
                continue
            key = ti_key(job)
            if job.job_id in watched.fresh:
                self._ahead.add(key)
            elif key in self._in_flight:
                self._passing[key] = False  # deferred, now in flight: the trigger fired, it finishes
                continue
            self._others[key] = self._clock() + DRAIN_SECONDS

    async def read(self, live: Sequence[JobRecord]) -> tuple[dict[str, Observation], str]:
        """Observations of the live jobs that this cycle's reads say may diverge, and which reads ran.

        The in-flight read and the count raise :class:`AirflowError`; a locating or checking read that
        fails is logged and tried again next cycle, and what the other reads found still counts.
        """
        now = self._clock()
        watched = self._watched
        watched.update(live)
        await self._widened(watched)  # with no job, nothing is new: the lists are empty
        # Only task instances the live jobs' id lists match are in the count; a watched key is the
        # job's to judge.
        self._others = {
            key: until
            for key, until in self._others.items()
            if until > now and key not in watched.jobs and watched.covers(key)
        }
        self._ahead &= self._others.keys()
        watched.others = {}
        for key in self._others:
            watched.others.setdefault(run_of(key), set()).add(key)
        if not watched.jobs:
            self.surplus = 0
            await self._airflow.ping()  # nothing to read, but readiness must mean "Airflow answers"
            return {}, "targeted"
        ids = watched.id_lists()
        passing, deferred = await asyncio.gather(
            self._rows(ids, lambda key: True, IN_FLIGHT_STATES, kind="in_flight"),
            self._counted(ids, DEFERRED_STATES, kind="deferred_count"),
        )
        in_flight = {key: ti for key, ti in passing.items() if watched.watches(key)}
        suspects = self._settle(watched, passing.keys(), now)
        cycle = _Cycle(watched)
        self._observe(cycle, in_flight)
        read = "targeted"
        # Above 0: deferred task instances the read does not know; below: known ones gone.
        difference = deferred - (watched.size() - len(in_flight))
        self.surplus = 0
        if difference:
            read += "+locate"
            expected = [key for key in watched.keys(watched.runs()) if key not in in_flight]
            difference, expected = await self._likely(cycle, difference, expected, suspects, passing.keys())
            if difference:
                region = Region.of(ids)
                self.surplus = await self._locate(cycle, region, expected, difference)
        due = self._due(watched, now)
        if due:
            read += "+check"
            await self._check(cycle, due, requeue=True)
        failed, found = cycle.failed, cycle.found
        if failed:
            read += f" ({len(failed)} failed)"
            log.warning(
                "%d targeted reads failed, tried again next cycle: %s",
                len(failed),
                failed[0],
                extra={"action": "targeted_read", "error": str(failed[0])},
            )
        return found, read

    async def _widened(self, watched: Watched) -> None:
        """Where the id lists grew (a new job's DAG, run or task id), the count takes in task
        instances no read has seen: one deferred there would hide a known one leaving in the same
        cycle, the two cancelling. So the deferred rows of what the lists newly cover are read
        first, and known from then on: at most three requests at once, over parts that do not
        overlap (new DAGs; then new runs of the other DAGs; then new tasks of the rest), usually one,
        for a new run, and none in a steady state. A term's first read takes none: its full check
        reads every run at full speed."""
        dags, runs, tasks = (frozenset(values) for values in watched.id_lists().values())
        before = self._ids_read
        if before is None:
            self._ids_read = (dags, runs, tasks)
            return
        old_dags, old_runs = dags & before[0], runs & before[1]
        regions: list[IdLists] = []
        if dags - before[0]:
            regions.append({"dag_ids": dags - before[0], "run_ids": runs, "task_ids": tasks})
        if old_dags and runs - before[1]:
            regions.append({"dag_ids": old_dags, "run_ids": runs - before[1], "task_ids": tasks})
        if old_dags and old_runs and tasks - before[2]:
            regions.append({"dag_ids": old_dags, "run_ids": old_runs, "task_ids": tasks - before[2]})
        unwatched = lambda key: not watched.watches(key)  # noqa: E731
        found = await asyncio.gather(
            *(self._rows(r, unwatched, DEFERRED_STATES, kind="rows") for r in regions)
        )
        for rows in found:
            self._learn(watched, rows)
        self._ids_read = (dags, runs, tasks)  # only once read: a read that failed is made again

    def _settle(
        self, watched: Watched, passing: Collection[TaskInstancePath], now: float
    ) -> list[TaskInstancePath]:
        """Bring what the read expects up to an in-flight read (``passing``: every task instance the
        id lists match in flight). A task instance that was in flight and no longer is has deferred
        or finished: one still to defer (a short job's, or one nobody watches, as a sensor or another
        sidecar's job) is expected deferred from now on, and returned: if the count falls short, it
        is the likely reason."""
        self._in_flight = {key for key in passing if watched.watches(key)}
        watched.settle(self._in_flight)
        suspects = [key for key in self._ahead if key not in passing]
        self._ahead.intersection_update(passing)
        for key, may_defer in self._passing.items():
            if may_defer and key not in passing and not watched.watches(key) and watched.covers(key):
                self._others[key] = now + DRAIN_SECONDS
                watched.others.setdefault(run_of(key), set()).add(key)
                suspects.append(key)
        self._passing = {key: self._passing.get(key, True) for key in passing if not watched.watches(key)}
        return suspects

    async def _likely(
        self,
        cycle: _Cycle,
        difference: int,
        expected: list[TaskInstancePath],
        suspects: list[TaskInstancePath],
        passing: Collection[TaskInstancePath],
    ) -> tuple[int, list[TaskInstancePath]]:
        """The likely reasons for ``difference`` first, in one request; returns what is left of it
        and the task instances known deferred. Below the count: ``suspects``, task instances that
        left flight expected to defer, finished instead. Above: task instances in flight at this
        cycle's read (``passing``) deferred before its count (the two requests run at once); the
        deferred rows their id lists match also show any other the read did not know."""
        if difference < 0 and suspects:
            finished = await self._finished_rows(cycle, suspects) or set()
            gone = finished.intersection(expected)
            return difference + len(gone), [key for key in expected if key not in gone]
        if difference < 0 or not passing:
            return difference, expected
        lists = id_lists(passing)
        dags, runs, tasks = lists["dag_ids"], lists["run_ids"], lists["task_ids"]
        # Unless those lists match many known ones: then their rows cost more than counting parts.
        if sum(k.dag_id in dags and k.run_id in runs and k.task_id in tasks for k in expected) > LEAF_KEYS:
            return difference, expected
        try:
            rows = await self._rows(lists, lambda key: True, DEFERRED_STATES, kind="rows")
        except AirflowError as exc:
            cycle.failed.append(exc)
            return difference, expected
        known = set(expected)
        new = [key for key in rows if key not in known]
        self._learn(cycle.watched, new)
        return difference - len(new), expected + new

    def _learn(self, watched: Watched, deferred: Iterable[TaskInstancePath]) -> None:
        """These task instances are deferred: the ones no job watches are expected from now on."""
        for key in deferred:
            if key not in watched.jobs:
                self._others.setdefault(key, FOUND)
                self._ahead.discard(key)

    async def _locate(
        self,
        cycle: _Cycle,
        region: Region,
        expected: list[TaskInstancePath],
        difference: int,
    ) -> int:
        """Account for ``difference``, by which ``region``'s deferred count differs from the
        ``expected`` task instances in it: cut the region and count each part until the parts are
        small, or a drop so dense that most runs hold one; then read the rows there. Returns how many
        task instances of the difference no read accounted for (one failed)."""
        runs = {run_of(key) for key in expected}
        dense = difference < 0 and (-difference * FANOUT >= len(runs) or len(runs) == 1)
        parts = [] if len(expected) <= LEAF_KEYS or dense else partition(region, expected, FANOUT)
        if len(parts) < 2:
            return await self._explain(cycle, region, expected, difference)
        try:
            counts = await asyncio.gather(
                *(self._counted(part.lists(), DEFERRED_STATES, kind="locate_count") for part, _ in parts)
            )
        except AirflowError as exc:
            cycle.failed.append(exc)
            return abs(difference)
        left = await asyncio.gather(
            *(
                self._locate(cycle, part, held, n - len(held))
                for (part, held), n in zip(parts, counts, strict=True)
                if n != len(held)
            )
        )
        return sum(left)

    async def _explain(
        self,
        cycle: _Cycle,
        region: Region,
        expected: list[TaskInstancePath],
        difference: int,
    ) -> int:
        """Read what accounts for ``difference`` in ``region``. Above what the read knows: the
        region's deferred rows (current task instances only, never history); those it did not know
        are known from then on, and the expected ones missing there are looked for among the finished
        ones. Below: the finished rows of the expected task instances."""
        if difference < 0:
            return await self._finished(cycle, expected, -difference)
        try:
            rows = await self._rows(region.lists(), lambda key: True, DEFERRED_STATES, kind="rows")
        except AirflowError as exc:
            cycle.failed.append(exc)
            return difference
        self._learn(cycle.watched, rows)
        gone = [key for key in expected if key not in rows]
        return await self._finished(cycle, gone, len(gone)) if gone else 0

    async def _finished(
        self,
        cycle: _Cycle,
        keys: list[TaskInstancePath],
        missing: int,
    ) -> int:
        """The finished task instances among ``keys``, ``missing`` of which have left ``deferred``
        (marked failed or success, skipped). If fewer show finished, some vanished (a deleted run):
        every row of their runs is read then."""
        gone = await self._finished_rows(cycle, keys)
        if gone is None:
            return missing
        if len(gone.intersection(keys)) >= missing:
            return 0
        runs = sorted({run_of(key) for key in keys})
        return 0 if await self._check(cycle, runs) else missing

    async def _finished_rows(
        self,
        cycle: _Cycle,
        keys: list[TaskInstancePath],
    ) -> set[TaskInstancePath] | None:
        """The watched (or expected) task instances Airflow holds in a finished state among those
        ``keys``' id lists match, observed; None if the read failed."""
        try:
            rows = await self._rows(id_lists(keys), cycle.watched.watches, FINISHED_STATES, kind="rows")
        except AirflowError as exc:
            cycle.failed.append(exc)
            return None
        self._observe(cycle, rows)
        return set(rows)

    async def _check(
        self,
        cycle: _Cycle,
        runs: Sequence[Run],
        *,
        requeue: bool = False,
    ) -> bool:
        """Read every watched task instance of ``runs`` (any state), about CHECK_KEYS a request; a
        watched key Airflow does not return is absent. With ``requeue``, the runs of a request that
        fails go back into the full check's round. False if a request failed."""
        groups: list[tuple[list[Run], list[TaskInstancePath]]] = [([], [])]
        for run in runs:
            if len(groups[-1][1]) >= CHECK_KEYS:
                groups.append(([], []))
            groups[-1][0].append(run)
            groups[-1][1].extend(cycle.watched.keys([run]))

        pages = asyncio.Semaphore(CHECK_PAGES)

        async def one(group: list[Run], keys: list[TaskInstancePath]) -> bool:
            try:
                async with pages:
                    answer = await self._rows(id_lists(keys), set(keys).__contains__, None, kind="rows")
            except AirflowError as exc:
                cycle.failed.append(exc)
                if requeue:
                    self._round.extend(group)
                return False
            self._observe(cycle, {key: answer.get(key) for key in keys})
            return True

        return all(await asyncio.gather(*(one(group, keys) for group, keys in groups if keys)))

    def _observe(self, cycle: _Cycle, rows: Mapping[TaskInstancePath, TaskInstance | None]) -> None:
        for key, ti in rows.items():
            # Out of ``deferred``, Airflow moved it on: no longer expected, unless it is yet to defer.
            to_defer = key in self._ahead and ti is not None and ti.state in IN_FLIGHT_STATES
            if (ti is None or ti.state != "deferred") and not to_defer and key in self._others:
                del self._others[key]
                self._ahead.discard(key)
                if ti is not None and ti.state in IN_FLIGHT_STATES:
                    self._passing[key] = False  # it deferred and resumed: it finishes next
            for job in cycle.watched.jobs.get(key, ()):
                observation = observe(ti)
                if isinstance(judge(job, observation), Stop):
                    cycle.found[job.job_id] = observation

    def missed(self) -> None:
        """Airflow gave no answer this cycle: while it gives none, a watched task instance may leave
        ``deferred`` and come back on another try (cleared and run again) without any read seeing it
        in flight, and the counts cannot tell. So the rolling full check goes at full speed, as a new
        term's first round, until it has read every watched run again: first the runs its round had
        yet to read, then the ones it had read. Nothing starts over, so an Airflow failing every few
        cycles still has every run read in turn."""
        done = self._round_seen.difference(self._round)
        self._round = sorted(done, reverse=True) + self._round  # popped from the end: the rest first
        self._first_round = True

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
