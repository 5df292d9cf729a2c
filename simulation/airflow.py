"""Airflow as the core reads it (:class:`reconciler.airflow.client.TaskInstanceReader`), on its own clock.

The world moves task instances as Airflow's scheduler, triggerer and people would; the reader answers
the sidecar from that state, page by page, and fails or dawdles when the world says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from reconciler.airflow.task_instances import AirflowError, TaskInstance, TaskInstancePath


@dataclass
class SimTI:
    path: TaskInstancePath
    state: str | None
    try_number: int
    identity: str  # Airflow 3's task-instance id: a new one per try, and for a run created again
    updated_at: datetime  # on Airflow's clock
    end_date: datetime | None = None
    watched: bool = True  # its operator submits jobs (False: a sensor or another system's task)

    def answer(self) -> TaskInstance:
        p = self.path
        return TaskInstance(
            p.dag_id,
            p.run_id,
            p.task_id,
            p.map_index,
            self.state,
            self.try_number,
            self.end_date,
            self.identity,
        )


class SimAirflow:
    def __init__(self, clock: Callable[[], datetime], page_size: int) -> None:
        self.clock = clock  # Airflow's metadata DB clock
        self.tis: dict[TaskInstancePath, SimTI] = {}
        self.page_size = page_size
        # Set by the world: the error a request gets now (None: answered), and how long it takes.
        self.fault: Callable[[str], AirflowError | None] = lambda request: None
        self.latency: Callable[[str], float] = lambda request: 0.0
        self.requests = 0
        self._ids = 0

    # --- what the world does -------------------------------------------------------------------------

    def new_identity(self) -> str:
        self._ids += 1
        return f"ti{self._ids:06d}"

    def set_state(self, ti: SimTI, state: str | None) -> None:
        ti.state = state
        ti.updated_at = self.clock()
        ti.end_date = ti.updated_at if state in ("success", "failed", "skipped", "upstream_failed") else None

    def new_try(self, ti: SimTI) -> None:
        """Cleared, or up for retry and scheduled again: the next try, under a new id."""
        ti.try_number += 1
        ti.identity = self.new_identity()
        self.set_state(ti, None)

    # --- what the sidecar reads ----------------------------------------------------------------------

    async def _request(self, name: str) -> None:
        self.requests += 1
        delay = self.latency(name)
        if delay > 0:
            await asyncio.sleep(delay)
        error = self.fault(name)
        if error is not None:
            raise error

    async def changed_since(self, since: datetime) -> list[TaskInstance]:
        await self._request("changed_since")
        return [ti.answer() for ti in self.tis.values() if ti.updated_at >= since]

    def _matching(
        self,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None] | None,
    ) -> list[SimTI]:
        dags, runs, tasks = set(dag_ids), set(run_ids), set(task_ids)
        return [
            ti
            for path, ti in sorted(self.tis.items())
            if path.dag_id in dags
            and path.run_id in runs
            and path.task_id in tasks
            and (states is None or ti.state in states)
        ]

    async def task_instance_pages(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None] | None = None,
    ) -> AsyncIterator[list[TaskInstance]]:
        dag_ids, run_ids, task_ids = list(dag_ids), list(run_ids), list(task_ids)
        offset = 0
        while True:
            # Offset paging over rows that may change between pages, as Airflow's batch endpoint.
            await self._request("task_instance_pages")
            rows = self._matching(dag_ids, run_ids, task_ids, states)
            page = rows[offset : offset + self.page_size]
            yield [ti.answer() for ti in page]
            offset += self.page_size
            if len(page) < self.page_size:
                return

    async def count_task_instances(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None],
    ) -> int:
        await self._request("count_task_instances")
        return len(self._matching(dag_ids, run_ids, task_ids, states))

    async def get_task_instance(
        self, *, dag_id: str, run_id: str, task_id: str, map_index: int
    ) -> TaskInstance | None:
        await self._request("get_task_instance")
        ti = self.tis.get(TaskInstancePath(dag_id, run_id, task_id, map_index))
        return ti.answer() if ti is not None else None

    async def ping(self) -> None:
        await self._request("ping")
