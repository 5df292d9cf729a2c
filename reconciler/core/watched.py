"""The targeted read's index of what it watches: the watched task instances by key and by run, the
id lists that match them, and the cut of those lists into parts whose cross products partition
theirs (:func:`partition`), which locates a count's difference."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from reconciler.airflow.task_instances import TaskInstancePath
from reconciler.core.observe import ti_key
from router_db import JobRecord

Run = tuple[str, str]  # (dag_id, run_id)
IdLists = dict[str, Collection[str]]


def run_of(key: TaskInstancePath) -> Run:
    return (key.dag_id, key.run_id)


def id_lists(keys: Collection[TaskInstancePath]) -> IdLists:
    """The batch endpoint's id lists that match ``keys`` (and whatever else their cross product does)."""
    return {
        "dag_ids": {k.dag_id for k in keys},
        "run_ids": {k.run_id for k in keys},
        "task_ids": {k.task_id for k in keys},
    }


@dataclass(frozen=True)
class Region:
    """The task instances the batch endpoint's id lists match: the cross product of these ids."""

    dag_ids: tuple[str, ...]
    run_ids: tuple[str, ...]
    task_ids: tuple[str, ...]

    @classmethod
    def of(cls, ids: IdLists) -> Region:
        dags, runs, tasks = (tuple(sorted(ids[name])) for name in ("dag_ids", "run_ids", "task_ids"))
        return cls(dags, runs, tasks)

    def lists(self) -> IdLists:
        return {"dag_ids": self.dag_ids, "run_ids": self.run_ids, "task_ids": self.task_ids}


def _coordinate(key: TaskInstancePath, axis: int) -> str:
    return (key.dag_id, key.run_id, key.task_id)[axis]


def partition(
    region: Region, keys: Iterable[TaskInstancePath], parts: int
) -> list[tuple[Region, list[TaskInstancePath]]]:
    """``region`` cut into at most ``parts`` regions whose cross products partition its own, each
    with the ``keys`` (all inside ``region``) it holds.

    The first list with more than one id (DAGs, then runs, then tasks) is cut into contiguous runs of
    ids holding about as many keys each (an id counts one more, so ids no key uses are spread too);
    the other lists stay whole, so no task instance of ``region`` falls outside every part, and the
    parts' counts add up to the region's. A region of one DAG, run and task comes back whole.
    """
    axes = (region.dag_ids, region.run_ids, region.task_ids)
    axis = next((n for n, ids in enumerate(axes) if len(ids) > 1), None)
    keys = list(keys)
    if axis is None:
        return [(region, keys)]
    ids = axes[axis]
    weight = Counter(_coordinate(key, axis) for key in keys)
    total = len(keys) + len(ids)
    part_of: dict[str, int] = {}
    before = 0
    for name in ids:
        # The id's midpoint places it: the first and last ids always land in different parts.
        own = weight[name] + 1
        part_of[name] = min(parts - 1, int((before + own / 2) * parts / total))
        before += own
    cuts: dict[int, tuple[list[str], list[TaskInstancePath]]] = {}
    for name in ids:
        cuts.setdefault(part_of[name], ([], []))[0].append(name)
    for key in keys:
        cuts[part_of[_coordinate(key, axis)]][1].append(key)
    out = []
    for names, held in cuts.values():
        cut = list(axes)
        cut[axis] = tuple(names)
        out.append((Region(cut[0], cut[1], cut[2]), held))
    return out


class Watched:
    """The watched task instances by key and by run, kept across cycles and updated by the jobs that
    come and go (a cycle of 100,000 jobs must not rebuild it), plus this cycle's other task
    instances expected deferred."""

    def __init__(self) -> None:
        self.by_id: dict[str, JobRecord] = {}
        self.jobs: dict[TaskInstancePath, list[JobRecord]] = {}
        self.by_run: dict[Run, set[TaskInstancePath]] = {}
        # Task instances not watched that the count takes in and the read knows to be deferred, or
        # to defer next (a job that ended first), that the id lists match: expected this cycle.
        self.others: dict[Run, set[TaskInstancePath]] = {}
        # Jobs whose task instance no read has found out of flight yet: its deferral is ahead.
        self.fresh: set[str] = set()
        self._read = False  # before a term's first read, a job is not taken for fresh (see settle)
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
        if self._read:
            self.fresh.add(job.job_id)
        jobs = self.jobs.get(key)
        if jobs is None:
            self.jobs[key] = jobs = []
            self.by_run.setdefault(run_of(key), set()).add(key)
            for count, name in zip(self._ids, (key.dag_id, key.run_id, key.task_id), strict=True):
                count[name] += 1
        jobs.append(job)

    def _remove(self, job: JobRecord) -> None:
        key = ti_key(job)
        self.fresh.discard(job.job_id)
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

    def settle(self, in_flight: Collection[TaskInstancePath]) -> None:
        """A read found these task instances in flight: every other watched one has left flight.
        (The first read of a term finds the fresh jobs among those in flight, rather than holding
        every job of a large set until then.)"""
        if not self._read:
            self._read = True
            self.fresh = {job.job_id for key in in_flight for job in self.jobs.get(key, ())}
            return
        self.fresh = {job_id for job_id in self.fresh if ti_key(self.by_id[job_id]) in in_flight}

    def covers(self, key: TaskInstancePath) -> bool:
        """Whether the whole set's id lists match ``key``."""
        dags, runs, tasks = self._ids
        return key.dag_id in dags and key.run_id in runs and key.task_id in tasks

    def id_lists(self) -> IdLists:
        dags, runs, tasks = self._ids
        return {"dag_ids": dags.keys(), "run_ids": runs.keys(), "task_ids": tasks.keys()}

    def watches(self, key: TaskInstancePath) -> bool:
        return key in self.jobs or key in self.others.get(run_of(key), ())

    def size(self) -> int:
        return len(self.jobs) + sum(map(len, self.others.values()))

    def keys(self, runs: Iterable[Run]) -> list[TaskInstancePath]:
        return [key for run in runs for keys in (self.by_run, self.others) for key in keys.get(run, ())]

    def runs(self) -> set[Run]:
        return self.by_run.keys() | self.others.keys()
