"""Airflow's answers from a script, for the poll loop run in-process: no server, no network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from reconciler.airflow.task_instances import AirflowError, TaskInstance
from router_db import JobRecord


@dataclass
class ScriptedAirflow:
    """Answers from a script: ``truth`` for direct reads, ``listed`` for list reads, or errors."""

    truth: dict[tuple[str, str, str, int], TaskInstance | None] = field(default_factory=dict)
    listed: list[TaskInstance] | None = None  # None: list reads return the truth
    fail_lists: bool = False
    fail_batch: bool = False  # only the full read's batch endpoint fails (a 403, a proxy's 413)
    fail_direct: bool = False
    fail_states: set[str | None] = field(default_factory=set)  # list reads asking these states fail
    latency: float = 0.0  # seconds each list read takes, so that reads overlap as real ones do
    calls: list[str] = field(default_factory=list)
    since: list[datetime] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0  # most list reads in flight at once

    async def changed_since(self, since: datetime) -> list[TaskInstance]:
        self.calls.append("changed_since")
        self.since.append(since)
        return self._list()

    async def task_instance_pages(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None] | None = None,
    ) -> AsyncIterator[list[TaskInstance]]:
        self.calls.append("batch" if states is None else "batch:" + ",".join(map(str, states)))
        if self.fail_batch:
            raise AirflowError("HTTP 403", status=403)
        await self._take_time(states)
        yield self._matching(dag_ids, run_ids, task_ids, states)

    async def count_task_instances(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None],
    ) -> int:
        """As Airflow counts: every task instance in the ids' cross product, in one of ``states``."""
        self.calls.append("count:" + ",".join(map(str, states)))
        if self.fail_batch:
            raise AirflowError("HTTP 403", status=403)
        await self._take_time(states)
        return len(self._matching(dag_ids, run_ids, task_ids, states))

    async def _take_time(self, states: Sequence[str | None] | None) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if states is not None and self.fail_states.intersection(states):
            raise AirflowError("HTTP 500", status=500)

    async def get_task_instance(
        self, *, dag_id: str, run_id: str, task_id: str, map_index: int
    ) -> TaskInstance | None:
        self.calls.append("direct")
        if self.fail_direct:
            raise AirflowError("HTTP 503")
        return self.truth.get((dag_id, run_id, task_id, map_index))

    async def ping(self) -> None:
        self.calls.append("ping")
        if self.fail_lists:
            raise AirflowError("connection refused")

    def _matching(
        self,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None] | None,
    ) -> list[TaskInstance]:
        """The batch endpoint's filter over the list: ids by cross product, then the states."""
        dags, runs, tasks = set(dag_ids), set(run_ids), set(task_ids)
        return [
            t
            for t in self._list()
            if t.dag_id in dags
            and t.run_id in runs
            and t.task_id in tasks
            and (states is None or t.state in states)
        ]

    def _list(self) -> list[TaskInstance]:
        if self.fail_lists:
            raise AirflowError("HTTP 500")
        if self.listed is not None:
            return list(self.listed)
        return [ti for ti in self.truth.values() if ti is not None]


def ti(job: JobRecord, state: str | None, try_number: int | None = None) -> TaskInstance:
    """The task instance of ``job`` as Airflow would answer it: in ``state``, on ``try_number``
    (default: the job's own try)."""
    k = job.key
    return TaskInstance(k.dag_id, k.run_id, k.task_id, k.map_index, state, try_number or k.try_number, None)
