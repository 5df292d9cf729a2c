"""The naive read, for comparison only: one direct request per active job every cycle.

It is what the other reads are measured against (``python -m bench.scale``); the sidecar never uses
it (10,000 requests per cycle at 10,000 jobs). It satisfies :class:`reconciler.core.reads.AirflowRead`,
so the bench builds the real loop around it (:func:`reconciler.core.parts.build_core`'s ``read``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from reconciler.airflow.task_instances import AirflowError, TaskInstanceReader
from reconciler.core.decision import Observation, Unknown
from reconciler.core.gather import bounded
from reconciler.core.observe import observe
from router_db import JobRecord


class NaiveRead:
    def __init__(self, airflow: TaskInstanceReader, *, concurrency: int) -> None:
        self._airflow = airflow
        self._concurrency = concurrency

    @property
    def failing(self) -> str | None:
        return None  # nothing to fall back from: a failed request is an unknown state, kept

    async def read(self, live: Sequence[JobRecord]) -> tuple[dict[str, Observation], str]:
        observations = await bounded(self._concurrency, [self._direct(job) for job in live])
        return {job.job_id: obs for job, obs in zip(live, observations, strict=True)}, "naive"

    async def _direct(self, job: JobRecord) -> Observation:
        key = job.key
        try:
            return observe(
                await self._airflow.get_task_instance(
                    dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
                )
            )
        except AirflowError as exc:
            return Unknown(str(exc))

    def ended(self, jobs: Iterable[JobRecord]) -> None:
        pass

    def restart(self) -> None:
        pass
