"""A lost agent's jobs end ``FAILED``, with a reason naming the agent and its last answer, so their
tasks fail and Airflow's retries run. Jobs submitted after the verdict end only once they too have gone
a whole ``lost_after_seconds`` without their agent answering. A fenced job (``at_most_once``) ends only
once the agent's fence has surely stopped it (:mod:`reconciler.fleet.fencing`): a retry elsewhere
never overlaps it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from agent_api.fencing import UNSAID
from reconciler.config import FleetConfig
from reconciler.fleet.agent_state import (
    TrackedAgent,
    fence_margin,
    fenced,
    gone_after,
    lost_job_transition,
    lost_reason,
)
from reconciler.fleet.fencing import fence_wait
from reconciler.metrics import Metrics
from router_db import JobRecord, RouterDB

log = logging.getLogger("reconciler.fleet.liveness")


class LostJobs:
    def __init__(
        self,
        db: RouterDB,
        metrics: Metrics,
        config: FleetConfig,
        *,
        changed: Callable[[Iterable[JobRecord]], object],
        started_at: datetime,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._config = config
        self._changed = changed  # told of the jobs it ended (their long-polls wake)
        self._started_at = started_at

    async def end(self, agent: TrackedAgent, *, silent_for: float) -> None:
        # Jobs submitted after the verdict are ended only once they too have gone a whole
        # lost_after_seconds without their agent answering (the agent may be back already). Their
        # created_at is the router DB's time, written by whichever replica took them: so are these.
        now = await asyncio.to_thread(self._db.now)
        lost_at = agent.lost_at = agent.lost_at or now
        window = timedelta(seconds=self._config.lost_after_seconds)
        jobs = [
            job
            for job in await asyncio.to_thread(self._db.active, agent_id=agent.id)
            if job.created_at <= lost_at or now - job.created_at >= window
        ]
        # A fenced job ends once the agent's fence has surely stopped it: never while it may run on.
        silent, margin = silent_for, fence_margin(agent, self._config)
        waits = {job.job_id: fence_wait(gone_after(agent, job), silent_for=silent, margin=margin)
                 for job in jobs if fenced(agent, job)}  # fmt: skip
        waiting = [job_id for job_id, wait in waits.items() if wait > 0]
        was_waiting, agent.fence_waiting = agent.fence_waiting, len(waiting)
        if waiting:
            jobs = [job for job in jobs if job.job_id not in waiting]
            if not was_waiting:
                log.warning(
                    "agent %s lost: %d at_most_once job(s) end FAILED in up to %.0f s, once its fence has "
                    "surely stopped them",
                    agent.id,
                    len(waiting),
                    max(waits.values()),
                    extra={"agent_id": agent.id, "action": "agent_fence_wait"},
                )
        if not jobs:
            return
        reason = lost_reason(agent, self._config, self._started_at)
        after = agent.fence.after_seconds if agent.fence is not None else UNSAID.after_seconds
        fence_note = (
            f"; fenced: the agent stops its at_most_once jobs once cut off for fence_after_seconds={after:g}"
        )
        ended = await asyncio.to_thread(
            self._db.apply,
            [lost_job_transition(job, reason + (fence_note if fenced(agent, job) else "")) for job in jobs],
            source="fleet",
        )
        self._changed(job for job in ended if job is not None)
        count = sum(job is not None for job in ended)
        self._metrics.lost_jobs.inc(count)
        self._metrics.fenced_jobs.inc(sum(job is not None and fenced(agent, job) for job in ended))
        if count:
            log.error("ended %d job(s) of lost agent %s", count, agent.id, extra={"agent_id": agent.id})
