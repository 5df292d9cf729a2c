"""The last word before a stop: a direct re-read of the one task instance, and the decision on it.

A cycle's read may be stale by the time it is acted on (a task cleared and run again since, an
answer from a lagging replica of Airflow's database): a job is stopped only if a fresh read of its
own task instance says stop too (:meth:`Confirmer.confirmed`). An error of that read keeps the job.
The push endpoint (a trigger's ``on_kill``, a person's ``agentic jobs stop``) asks the same question
of one job at once (:meth:`Confirmer.check`) and stops it if it diverges.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from reconciler.airflow.task_instances import AirflowError, TaskInstance, TaskInstanceReader
from reconciler.core.decision import MAX_NOTE_CHARS, Keep, Stop, Unknown
from reconciler.core.gather import bounded
from reconciler.core.observe import judge, observe
from reconciler.core.stops import StopDispatcher
from reconciler.logfields import job_fields
from reconciler.metrics import Metrics
from router_db import JobRecord

log = logging.getLogger("reconciler.core.confirmer")


class Confirmer:
    def __init__(
        self,
        airflow: TaskInstanceReader,
        dispatcher: StopDispatcher,
        metrics: Metrics,
        *,
        concurrency: int,
        wall: Callable[[], datetime],
    ) -> None:
        self._airflow = airflow
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._concurrency = concurrency
        self._wall = wall

    async def confirmed(self, suspects: Sequence[JobRecord]) -> list[tuple[JobRecord, Stop]]:
        """The suspects whose fresh read says stop too, with the stop (not yet carried out)."""
        verdicts = await bounded(self._concurrency, [self._confirm(job) for job in suspects])
        return [(job, verdict) for job, verdict in zip(suspects, verdicts, strict=True) if verdict]

    async def _confirm(self, job: JobRecord) -> Stop | None:
        try:
            ti = await self._read(job)
            verdict = judge(job, observe(ti))
        except AirflowError as exc:
            ti, verdict = None, judge(job, Unknown(str(exc)))
        if isinstance(verdict, Keep):
            log.info("divergence not confirmed: %s", verdict.why, extra=job_fields(job, action="keep"))
            return None
        self._metrics.divergences.labels(verdict.kind).inc()
        if ti is not None and ti.end_date is not None:
            self._metrics.detection_latency.observe(max(0.0, (self._wall() - ti.end_date).total_seconds()))
        return verdict

    async def check(self, job: JobRecord, *, source: str, note: str | None = None) -> Stop | None:
        """Confirm one job against Airflow now and stop it if it diverges: the push endpoint's path.
        ``note`` (what the caller said, e.g. who asked) joins the stop's reason in the audit trail.

        Raises :class:`AirflowError` when Airflow cannot answer, so the caller can say so.
        """
        verdict = judge(job, observe(await self._read(job)))
        if isinstance(verdict, Keep):
            return None
        self._metrics.divergences.labels(verdict.kind).inc()
        if note:
            verdict = dataclasses.replace(verdict, reason=f"{verdict.reason}; {note[:MAX_NOTE_CHARS]}")
        await self._dispatcher.stop(job, verdict, source=source)
        return verdict

    async def _read(self, job: JobRecord) -> TaskInstance | None:
        key = job.key
        return await self._airflow.get_task_instance(
            dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
        )
