"""The orphan sweep: an agent's queued and running jobs that the router DB has ended are stopped.

It runs for every live agent every ``orphan_sweep_seconds``, and at once when a lost agent answers
again or a registered one restarts (its jobs were ended while it kept running them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from agent_api.client import AgentError, JobInfo
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, RouterDB

log = logging.getLogger("reconciler.fleet.orphans")


def orphans(running: Iterable[JobInfo], records: dict[str, JobRecord]) -> list[tuple[str, str]]:
    """The agent's jobs that must not run: ``(job_id, why)`` for each one the router DB has ended.

    A job the router DB does not know is left alone: another sidecar may share the agent, or this
    router DB may be new or restored from a backup; not knowing is no proof that it must stop."""
    return [
        (info.job_id, f"orphan: the router DB has ended the job {record.status}")
        for info in running
        if (record := records.get(info.job_id)) is not None and not record.active
    ]


class OrphanSweep:
    def __init__(self, db: RouterDB, pool: AgentPool, metrics: Metrics) -> None:
        self._db = db
        self._pool = pool
        self._metrics = metrics

    async def sweep(self, agent_id: str) -> int:
        """Stop the agent's jobs that the router DB has ended; returns how many."""
        client = self._pool.client(agent_id)
        running = await client.jobs(str(JobStatus.QUEUED), str(JobStatus.RUNNING))
        if not running:
            return 0
        records = await asyncio.to_thread(self._db.get_many, [info.job_id for info in running])
        stopped = 0
        for job_id, why in orphans(running, records):
            fields = {"job_id": job_id, "agent_id": agent_id, "action": "stop_orphan"}
            log.warning("stopping %s", why, extra=fields)
            try:
                result = await client.stop(job_id, reason=why)
            except AgentError as exc:
                log.warning("orphan stop failed; retried at the next sweep: %s", exc, extra=fields)
                continue
            if result.ok:
                stopped += 1
                self._metrics.orphans_stopped.inc()
        return stopped
