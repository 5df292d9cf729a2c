"""Carries out stops: intent first in the router DB, then the agent call with backoff.

A stop whose agent calls all fail stays ``STOPPING``; every cycle resumes such stops, so a stop
outlives agent outages and reconciler restarts alike.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from agent.client import AgentRejected, AgentUnavailable, JobNotFound, StopResult
from reconciler.agents import AgentPool
from reconciler.config import StopConfig
from reconciler.decision import Stop
from reconciler.logs import job_fields
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, RouterDB, StaleTransition

log = logging.getLogger("reconciler.stops")


class StopDispatcher:
    def __init__(self, db: RouterDB, agents: AgentPool, metrics: Metrics, config: StopConfig) -> None:
        self._db = db
        self._agents = agents
        self._metrics = metrics
        self._config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        # One slow or hanging agent must not hold every slot: each agent gets its own share.
        self._agent_slots: dict[str, asyncio.Semaphore] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def stop(self, job: JobRecord, decision: Stop, *, source: str) -> JobRecord | None:
        """Record the intent, then start the agent call. ``None`` if the job moved on meanwhile."""
        try:
            stopping = await asyncio.to_thread(
                self._db.request_stop,
                job.job_id,
                stop_status=decision.final_status,
                reason=decision.reason,
                source=source,
            )
        except StaleTransition:
            return None
        log.info(
            "stop requested: %s", decision.reason, extra=job_fields(job, action="stop", kind=decision.kind)
        )
        self.resume(stopping)
        return stopping

    async def wait(self, job_id: str, timeout: float) -> None:
        """Wait up to ``timeout`` for the agent call of a stop under way (if any) to finish."""
        task = self._inflight.get(job_id)
        if task is not None:
            await asyncio.wait([task], timeout=timeout)

    def resume(self, job: JobRecord) -> None:
        """Make sure a STOPPING job has an agent call under way (at most one per job)."""
        if job.status is not JobStatus.STOPPING or job.job_id in self._inflight:
            return
        task = asyncio.create_task(self._carry_out(job), name=f"stop-{job.job_id}")
        self._inflight[job.job_id] = task
        task.add_done_callback(lambda _: self._inflight.pop(job.job_id, None))

    async def drain(self, timeout: float) -> None:
        """Let stops under way finish (graceful shutdown); unfinished ones resume after restart."""
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=timeout)

    async def _carry_out(self, job: JobRecord) -> None:
        fields = job_fields(job, action="stop")
        agent_slots = self._agent_slots.setdefault(
            job.agent_id, asyncio.Semaphore(self._config.per_agent_concurrency)
        )
        async with agent_slots, self._slots:
            try:
                result = await self._call_agent(job)
            except JobNotFound:
                self._metrics.stop_requests.labels("unknown_job").inc()
                log.warning("agent has no record of the job; recording it as ended", extra=fields)
                await self._finish(
                    job, JobStatus.FAILED, None, f"{job.reason}; agent has no record of the job"
                )
                return
            except AgentRejected as exc:
                self._metrics.stop_requests.labels("rejected").inc()
                log.error("agent refused the stop: %s", exc, extra={**fields, "error": str(exc)})
                return
            except AgentUnavailable as exc:
                self._metrics.stop_requests.labels("retry").inc()
                log.warning("agent unreachable; stop resumes next cycle", extra={**fields, "error": str(exc)})
                return
        if result.action == "already_finished":
            # The process ended on its own before the stop: record what it really did.
            self._metrics.stop_requests.labels("already_finished").inc()
            status = (
                JobStatus(result.status) if result.status in ("SUCCEEDED", "FAILED") else JobStatus.FAILED
            )
            await self._finish(job, status, result.rc, f"{job.reason}; job had already ended on the agent")
        else:
            self._metrics.stop_requests.labels("stopped").inc()
            await self._finish(job, job.stop_status or JobStatus.FAILED, result.rc, job.reason)
        log.info("job stopped (rc=%s, %s)", result.rc, result.action, extra=fields)

    async def _call_agent(self, job: JobRecord) -> StopResult:
        client = self._agents.client(job.agent_id)
        # A stop that has not completed for force_after_seconds goes straight to SIGKILL.
        overdue = (
            job.stop_requested_at is not None
            and (datetime.now(UTC) - job.stop_requested_at).total_seconds()
            >= self._config.force_after_seconds
        )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._config.attempts),
            # Exponential from backoff_initial_seconds, with up to as much jitter again, so that many
            # stops retrying one agent do not arrive in lockstep.
            wait=wait_exponential_jitter(
                multiplier=self._config.backoff_initial_seconds,
                max=self._config.backoff_max_seconds,
                jitter=self._config.backoff_initial_seconds,
            ),
            retry=retry_if_exception_type(AgentUnavailable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await client.stop(
                    job.job_id, force=overdue, reason=job.reason or "stopped by reconciler"
                )
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True always raises or returns

    async def _finish(self, job: JobRecord, status: JobStatus, rc: int | None, reason: str | None) -> None:
        try:
            await asyncio.to_thread(
                self._db.finish, job.job_id, status=status, rc=rc, reason=reason, source="reconciler"
            )
        except StaleTransition:
            log.info("job already final; nothing to record", extra=job_fields(job))
