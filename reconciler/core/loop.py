"""The poll loop: a thin cycle over the sidecar's parts, built once (:func:`.parts.build_core`).

Each cycle takes the active jobs (:mod:`.active_jobs`), ends those of agents it can no longer
address (:mod:`.agent_sync`), reads Airflow (:mod:`.reads`), has each would-be stop confirmed by a
direct read (:mod:`.confirmer`), and hands the confirmed stops to the dispatcher (:mod:`.stops`).
Stops left pending by a crash or an outage are resumed first. An error of Airflow keeps every job
(uncertainty never stops one); one of the router DB fails the cycle alone. Beside the cycles, on
clocks of their own, run the rounds with the agents (:meth:`.agent_sync.AgentSync.run`) and the
agents' liveness (:meth:`reconciler.fleet.liveness.Fleet.run`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from reconciler.airflow.task_instances import AirflowError
from reconciler.core.active_jobs import ActiveJobs
from reconciler.core.agent_sync import AgentSync
from reconciler.core.confirmer import Confirmer
from reconciler.core.decision import Stop
from reconciler.core.observe import judge
from reconciler.core.reads import AirflowRead
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.liveness import Fleet
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus

log = logging.getLogger("reconciler.core.loop")


@dataclass
class CycleReport:
    result: str = "ok"
    read: str = ""  # "targeted" (+locate, +check), "incremental", "full", or a fallback's
    active: int = 0
    candidates: int = 0  # jobs whose observation this cycle would stop them, before confirmation
    stops: list[tuple[JobRecord, Stop]] = field(default_factory=list)
    unconfirmed: int = 0


class ReconcileLoop:
    def __init__(
        self,
        *,
        jobs: ActiveJobs,
        read: AirflowRead,
        confirmer: Confirmer,
        sync: AgentSync,
        dispatcher: StopDispatcher,
        metrics: Metrics,
        fleet: Fleet | None,
        interval_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.jobs = jobs
        self.read = read
        self.confirmer = confirmer
        self.sync = sync
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._fleet = fleet  # agents' liveness runs beside the cycles, on its own clock
        self._interval = interval_seconds
        self._clock = clock
        self.last_success: float | None = None  # ``clock`` time of the last successful cycle

    async def run(self, stopping: asyncio.Event) -> None:
        # A new term starts from scratch: what an earlier term read is stale (another replica led
        # meanwhile), so the first cycle reloads the jobs and reads everything again.
        self.jobs.restart()
        self.read.restart()
        self.sync.restart()
        self._metrics.leader.set(1)
        fleet = asyncio.create_task(self._fleet.run(stopping)) if self._fleet is not None else None
        # Rounds with the agents on their own clock: a slow Airflow delays no exit, a silent agent no read.
        jobs, read_at = self.jobs.known, lambda: self.jobs.read_clock
        rounds = asyncio.create_task(self.sync.run(stopping, jobs=jobs, read_at=read_at))
        try:
            while not stopping.is_set():
                started = self._clock()
                await self.cycle(agents_apart=True)
                delay = max(0.0, self._interval - (self._clock() - started))
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            background = [task for task in (fleet, rounds) if task is not None]
            for task in background:
                task.cancel()
            await asyncio.gather(*background, self.sync.stop(), return_exceptions=True)
            self._metrics.leader.set(0)
            self._metrics.full_resync_failing.set(0)  # a standby reads nothing: no stale alert

    async def cycle(self, *, dry_run: bool = False, agents_apart: bool = False) -> CycleReport:
        """One reconciliation pass. With ``dry_run`` it reads and decides but changes nothing.

        ``agents_apart`` (the running loop's): the agents are heard apart, on their own clock
        (:meth:`AgentSync.run`); otherwise the pass hears them beside its read of Airflow."""
        started = self._clock()
        try:
            report = await self._cycle(dry_run, agents_apart)
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
        self._metrics.cycle_duration.observe(self._clock() - started)
        if report.result == "ok" and not dry_run:
            self.last_success = self._clock()
            self._metrics.last_success.set(time.time())
        return report

    async def _cycle(self, dry_run: bool, agents_apart: bool) -> CycleReport:
        jobs = await self.sync.end_unaddressable(await self.jobs.current(), dry_run=dry_run)
        self._metrics.active_jobs.set(len(jobs))
        self._metrics.stopping_jobs.set(sum(job.status is JobStatus.STOPPING for job in jobs))
        report = CycleReport(active=len(jobs))
        live = [j for j in jobs if j.status is not JobStatus.STOPPING]
        if dry_run:
            await self._against_airflow(live, report, dry_run=True)
            return report
        for job in jobs:
            self._dispatcher.resume(job)  # finishes stops left pending by a crash or an outage
        # Agent bookkeeping (exits, liveness, orphans) never waits for Airflow, nor Airflow for it.
        if agents_apart:  # the running loop's rounds run apart (AgentSync.run)
            await self._against_airflow(live, report, dry_run=False)
            return report
        outcomes = await asyncio.gather(
            self.sync.round(jobs), self._against_airflow(live, report, dry_run=False), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return report

    async def _against_airflow(self, live: list[JobRecord], report: CycleReport, *, dry_run: bool) -> None:
        self.read.ended(self.jobs.left())
        observations, report.read = await self.read.read(live)
        report.candidates = len(observations)
        suspects = [
            job
            for job in live
            if job.job_id in observations and isinstance(judge(job, observations[job.job_id]), Stop)
        ]
        report.stops = await self.confirmer.confirmed(suspects)
        report.unconfirmed = len(suspects) - len(report.stops)
        if report.stops and not dry_run:
            await self._dispatcher.stop_many(report.stops, source="reconciler")
