"""Carries out stops: intent first in the router DB, then the agent call with backoff.

A stop whose agent calls all fail, or whose router DB cannot be read or written, stays ``STOPPING``;
every cycle resumes such stops, so a stop outlives agent and router DB outages and reconciler restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

from sqlalchemy.exc import SQLAlchemyError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from agent_api.client import AgentRejected, AgentUnavailable, JobNotFound, StopResult
from reconciler.config import StopConfig
from reconciler.core.decision import Stop
from reconciler.core.outcome import RetryForced, after_stop
from reconciler.fleet.agents import AgentPool, NoAgent, WrongAgent
from reconciler.logfields import job_fields
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, RouterDB, Transition

log = logging.getLogger("reconciler.core.stops")


class StopDispatcher:
    def __init__(
        self,
        db: RouterDB,
        agents: AgentPool,
        metrics: Metrics,
        config: StopConfig,
        *,
        changed: Callable[[Iterable[JobRecord]], object],  # told of every record it changed
    ) -> None:
        self._db = db
        self._agents = agents
        self._metrics = metrics
        self._config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        # One slow or hanging agent must not hold every slot: each agent gets its own share.
        self._agent_slots: dict[str, asyncio.Semaphore] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._outcomes: list[tuple[Transition, asyncio.Future[JobRecord | None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Jobs whose last stop left processes alive after SIGKILL: their next attempt forces at once.
        self._force: set[str] = set()
        # Told of every record this dispatcher changed (the long-poll's watch wakes its waiters).
        self.changed = changed

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def stop(self, job: JobRecord, decision: Stop, *, source: str) -> JobRecord | None:
        """Record the intent, then start the agent call. ``None`` if the job moved on meanwhile."""
        (stopping,) = await self.stop_many([(job, decision)], source=source)
        return stopping

    async def stop_many(
        self, stops: Sequence[tuple[JobRecord, Stop]], *, source: str
    ) -> list[JobRecord | None]:
        """Record many stop intents in one transaction, then start their agent calls."""
        transitions = [Transition.stop(job.job_id, stop.final_status, stop.reason) for job, stop in stops]
        recorded = await asyncio.to_thread(self._db.apply, transitions, source=source)
        self.changed(record for record in recorded if record is not None)
        for (job, stop), stopping in zip(stops, recorded, strict=True):
            if stopping is None:
                continue  # it ended or another replica moved it meanwhile
            log.info("stop requested: %s", stop.reason, extra=job_fields(job, action="stop", kind=stop.kind))
            self.resume(stopping)
        return recorded

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

    async def finish(self, timeout: float) -> None:
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
                result: StopResult | None = await self._call_agent(job)
            except JobNotFound:
                result = None
            except AgentRejected as exc:
                self._metrics.stop_requests.labels("rejected").inc()
                log.error("agent refused the stop: %s", exc, extra={**fields, "error": str(exc)})
                return
            except WrongAgent:  # nothing was sent; the fleet logged the mismatch once, not per stop
                self._metrics.stop_requests.labels("retry").inc()
                return
            except AgentUnavailable as exc:
                self._metrics.stop_requests.labels("retry").inc()
                log.warning("agent unreachable; stop resumes next cycle", extra={**fields, "error": str(exc)})
                return
            except NoAgent as exc:  # a registered agent this replica has not read yet, or one forgotten
                self._metrics.stop_requests.labels("retry").inc()
                log.warning(
                    "agent unknown here; stop resumes next cycle", extra={**fields, "error": str(exc)}
                )
                return
            except SQLAlchemyError as exc:  # the router DB's time (is the stop overdue?) was unreadable
                self._metrics.stop_requests.labels("retry").inc()
                log.warning(
                    "router DB unavailable; stop resumes next cycle", extra={**fields, "error": str(exc)}
                )
                return
        outcome = after_stop(
            intent=job.stop_status,
            reason=job.reason,
            ok=result.ok if result else None,
            action=result.action if result else None,
            rc=result.rc if result else None,
        )
        self._metrics.stop_requests.labels(outcome.kind).inc()
        if isinstance(outcome, RetryForced):
            # Processes survived SIGKILL (uninterruptible sleep, a frozen cgroup): not stopped. The
            # job stays STOPPING and the next cycle tries again, with force.
            self._force.add(job.job_id)
            message = result.message if result else ""
            log.error("stop incomplete, retried next cycle: %s", message, extra=fields)
            return
        self._force.discard(job.job_id)
        if result is None:
            log.warning("agent has no record of the job; recording it as ended", extra=fields)
        await self._finish(job, outcome.status, outcome.rc, outcome.reason)
        if result is not None:
            log.info("job stopped (rc=%s, %s)", result.rc, result.action, extra=fields)

    async def _call_agent(self, job: JobRecord) -> StopResult:
        client = self._agents.client(job.agent_id)
        # A stop that has not completed for force_after_seconds goes straight to SIGKILL. The intent's
        # time is the router DB's, whichever replica recorded it: so is the time it is compared with.
        overdue = job.job_id in self._force or (
            job.stop_requested_at is not None
            and (await asyncio.to_thread(self._db.now) - job.stop_requested_at).total_seconds()
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
        """Record the outcome; returns once it is committed. Outcomes that arrive together (a burst
        of stops) share one transaction instead of one commit each."""
        recorded: asyncio.Future[JobRecord | None] = asyncio.get_running_loop().create_future()
        self._outcomes.append((Transition.finish(job.job_id, status, rc, reason), recorded))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_outcomes())
        try:
            if await recorded is None:
                log.info("job already final; nothing to record", extra=job_fields(job))
        except Exception as exc:
            # Stays STOPPING: the next cycle resumes it and the agent answers "already finished".
            log.error(
                "router DB unavailable; outcome recorded on resume",
                extra={**job_fields(job), "error": str(exc)},
            )

    async def _flush_outcomes(self) -> None:
        while self._outcomes:
            batch, self._outcomes = self._outcomes, []
            try:
                results = await asyncio.to_thread(self._db.apply, [t for t, _ in batch], source="reconciler")
            except Exception as exc:  # the router DB is down: each stop stays STOPPING and resumes later
                for _, recorded in batch:
                    recorded.set_exception(exc)
                continue
            self.changed(result for result in results if result is not None)
            for (_, recorded), result in zip(batch, results, strict=True):
                recorded.set_result(result)
