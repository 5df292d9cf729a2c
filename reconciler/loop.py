"""The poll loop: read task-instance states, decide, confirm, and hand stops to the dispatcher.

One cycle reads every active job's task instance with a single batch request per page, then re-reads
each would-be stop directly before acting. Airflow errors keep every job: uncertainty never stops one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from agent.client import AgentError, JobNotFound
from reconciler.agents import AgentPool
from reconciler.airflow import AirflowClient, AirflowError, TaskInstance
from reconciler.decision import Absent, Keep, Observation, Observed, Stop, Unknown, decide
from reconciler.logs import job_fields
from reconciler.metrics import Metrics
from reconciler.stops import StopDispatcher
from router_db import JobRecord, JobStatus, RouterDB, StaleTransition

log = logging.getLogger("reconciler.loop")

CONFIRM_CONCURRENCY = 16  # direct re-reads in flight at once: bounded load on Airflow
T = TypeVar("T")


@dataclass
class CycleReport:
    result: str = "ok"
    active: int = 0
    stops: list[tuple[JobRecord, Stop]] = field(default_factory=list)
    unconfirmed: int = 0


def observe(ti: TaskInstance | None) -> Observation:
    return Absent() if ti is None else Observed(ti.state, ti.try_number)


class Reconciler:
    def __init__(
        self,
        *,
        db: RouterDB,
        airflow: AirflowClient,
        agents: AgentPool,
        dispatcher: StopDispatcher,
        metrics: Metrics,
        interval: float,
        agent_sync_interval: float,
    ) -> None:
        self._db = db
        self._airflow = airflow
        self._agents = agents
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._interval = interval
        self._agent_sync_interval = agent_sync_interval
        self._last_agent_sync = float("-inf")
        self.last_success: float | None = None  # monotonic time of the last successful cycle

    async def run(self, stopping: asyncio.Event) -> None:
        self._metrics.leader.set(1)
        while not stopping.is_set():
            started = time.monotonic()
            await self.cycle()
            delay = max(0.0, self._interval - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
        self._metrics.leader.set(0)

    async def cycle(self, *, dry_run: bool = False) -> CycleReport:
        """One reconciliation pass. With ``dry_run`` it reads and decides but changes nothing."""
        started = time.monotonic()
        try:
            report = await self._cycle(dry_run)
        except AirflowError as exc:
            log.warning("airflow unusable this cycle; keeping every job: %s", exc, extra={"error": str(exc)})
            report = CycleReport(result="airflow_error")
        except SQLAlchemyError as exc:
            log.error("router DB unusable this cycle: %s", type(exc).__name__, extra={"error": str(exc)})
            report = CycleReport(result="db_error")
        except Exception as exc:  # the loop must outlive any single bad cycle
            log.exception("cycle failed", extra={"error": str(exc)})
            report = CycleReport(result="error")
        self._metrics.cycles.labels(report.result).inc()
        self._metrics.cycle_duration.observe(time.monotonic() - started)
        if report.result == "ok" and not dry_run:
            self.last_success = time.monotonic()
            self._metrics.last_success.set(time.time())
        return report

    async def _cycle(self, dry_run: bool) -> CycleReport:
        jobs = await asyncio.to_thread(self._db.active)
        self._metrics.active_jobs.set(len(jobs))
        report = CycleReport(active=len(jobs))
        live = [j for j in jobs if j.status is not JobStatus.STOPPING]
        if not dry_run:
            for job in jobs:
                self._dispatcher.resume(job)  # finishes stops left pending by a crash or an outage
        if not live:
            await self._airflow.ping()  # nothing to read, but readiness must still mean "Airflow answers"
            return report

        seen = await self._airflow.list_task_instances(
            dag_ids={j.key.dag_id for j in live},
            run_ids={j.key.run_id for j in live},
            task_ids={j.key.task_id for j in live},
        )
        by_key = {ti.key: ti for ti in seen}
        suspects = [
            job
            for job in live
            if isinstance(decide(job.key.try_number, observe(by_key.get(_ti_key(job)))), Stop)
        ]
        confirmed = await _bounded(CONFIRM_CONCURRENCY, [self._confirm(job) for job in suspects])
        for job, verdict in zip(suspects, confirmed, strict=True):
            if verdict is None:
                report.unconfirmed += 1
                continue
            stop, ti = verdict
            self._metrics.divergences.labels(stop.kind).inc()
            if ti is not None and ti.end_date is not None:
                lag = (datetime.now(UTC) - ti.end_date).total_seconds()
                self._metrics.detection_latency.observe(max(0.0, lag))
            report.stops.append((job, stop))
            if not dry_run:
                await self._dispatcher.stop(job, stop, source="reconciler")

        if not dry_run and time.monotonic() - self._last_agent_sync >= self._agent_sync_interval:
            self._last_agent_sync = time.monotonic()
            stopped = {job.job_id for job, _ in report.stops}
            await self.sync_from_agents([j for j in live if j.job_id not in stopped])
        return report

    async def _confirm(self, job: JobRecord) -> tuple[Stop, TaskInstance | None] | None:
        """Re-read the one task instance; the stop stands only if the fresh answer says stop too."""
        key = job.key
        try:
            ti = await self._airflow.get_task_instance(key.dag_id, key.run_id, key.task_id, key.map_index)
            observation: Observation = observe(ti)
        except AirflowError as exc:
            ti, observation = None, Unknown(str(exc))
        verdict = decide(key.try_number, observation)
        if isinstance(verdict, Keep):
            log.info("divergence not confirmed: %s", verdict.why, extra=job_fields(job, action="keep"))
            return None
        return verdict, ti

    async def sync_from_agents(self, jobs: Sequence[JobRecord]) -> None:
        """The reverse direction: record jobs that ended on their agent without anyone noticing."""
        await _bounded(CONFIRM_CONCURRENCY, [refresh_from_agent(self._db, self._agents, job) for job in jobs])


async def refresh_from_agent(
    db: RouterDB, agents: AgentPool, job: JobRecord, *, timeout: float = 5.0
) -> JobRecord:
    """Ask the job's agent about a queued or running job and record what it reports.

    Used by the loop (periodically) and by the sidecar's ``GET /jobs/{id}`` (so the operator's
    trigger learns of an exit at once). An unreachable agent leaves the record as it is.
    """
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return job
    try:
        info = await asyncio.wait_for(agents.client(job.agent_id).get(job.job_id), timeout)
    except JobNotFound:
        if job.status is not JobStatus.QUEUED:
            return job
        return await _record(db, job, JobStatus.FAILED, None, "agent never started the job")
    except (AgentError, TimeoutError):
        return job
    if info.status in ("SUCCEEDED", "FAILED"):
        return await _record(
            db, job, JobStatus(info.status), info.rc, info.reason or f"exited with rc {info.rc}"
        )
    if info.status == "RUNNING" and job.status is JobStatus.QUEUED:
        try:
            return await asyncio.to_thread(db.mark_running, job.job_id, source="agent")
        except StaleTransition:
            pass
    return job


async def _record(db: RouterDB, job: JobRecord, status: JobStatus, rc: int | None, reason: str) -> JobRecord:
    try:
        done = await asyncio.to_thread(
            db.finish, job.job_id, status=status, rc=rc, reason=reason, source="agent"
        )
    except StaleTransition:
        return await asyncio.to_thread(db.get, job.job_id) or job
    log.info("job ended on agent: %s", reason, extra=job_fields(job, action="record_exit"))
    return done


async def _bounded(limit: int, calls: Sequence[Awaitable[T]]) -> list[T]:
    slots = asyncio.Semaphore(limit)

    async def one(call: Awaitable[T]) -> T:
        async with slots:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


def _ti_key(job: JobRecord) -> tuple[str, str, str, int]:
    return (job.key.dag_id, job.key.run_id, job.key.task_id, job.key.map_index)
