"""What agents report about many jobs at once, recorded in the router DB in one transaction.

An agent reports the jobs that changed since it last told (the loop's catch-up, ``GET
/jobs?changed_since=``, once a cycle; an agent's heartbeat). Each report is judged by the same rules
as one job's ``GET /jobs/{id}`` answer (:func:`reconciler.outcome.after_status`): an exit ends the job
with its status and rc, a start marks it RUNNING. A ``full`` report lists every job the agent knows,
so an active job of that agent missing from it is judged as an agent's 404 is (a QUEUED job past its
start grace is given up; a RUNNING one is left to the orphan sweep and the stops).

:func:`plan` is pure; :func:`apply_agent_reports` reads the records, applies the plan with
:meth:`RouterDB.apply` and wakes the long-poll waiters of the jobs that changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent_api.client import AgentClient, AgentError, JobInfo, JobNotFound
from reconciler.agents import AgentPool
from reconciler.logfields import job_fields
from reconciler.outcome import Finish, GiveUp, MarkRunning, after_never_started_stop, after_status
from reconciler.watch import JobWatch
from router_db import JobRecord, JobStatus, RouterDB, StaleTransition, Transition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    transitions: list[Transition] = field(default_factory=list)
    give_up: list[JobRecord] = field(default_factory=list)  # QUEUED jobs the agent never started


def plan(
    records: Mapping[str, JobRecord],
    reports: Sequence[JobInfo],
    *,
    agent_id: str,
    full: bool,
    now: datetime,
) -> Plan:
    """What to record for ``reports`` from ``agent_id``, given the router DB's ``records`` (of the
    reported jobs, and with ``full`` of every active job of the agent). A report of a job the router
    DB does not know, or knows on another agent, is ignored."""
    result = Plan()
    seen: set[str] = set()
    for info in reports:
        job = records.get(info.job_id)
        if job is None or job.agent_id != agent_id:
            continue
        seen.add(job.job_id)
        _judge(result, job, info, now)
    if full:
        for job in records.values():
            if job.agent_id == agent_id and job.job_id not in seen and job.active:
                _judge(result, job, None, now)
    return result


def _judge(result: Plan, job: JobRecord, info: JobInfo | None, now: datetime) -> None:
    outcome = after_status(
        job.status,
        info.status if info else None,
        rc=info.rc if info else None,
        reason=info.reason if info else None,
        queued_for=(now - job.created_at).total_seconds(),
    )
    if isinstance(outcome, Finish):
        result.transitions.append(Transition.finish(job.job_id, outcome.status, outcome.rc, outcome.reason))
    elif isinstance(outcome, MarkRunning):
        result.transitions.append(Transition.running(job.job_id))
    elif isinstance(outcome, GiveUp):
        result.give_up.append(job)


async def apply_agent_reports(
    db: RouterDB,
    agents: AgentPool,
    watch: JobWatch,
    agent_id: str,
    reports: Sequence[JobInfo],
    *,
    full: bool = False,
    now: datetime,
) -> int:
    """Record what ``agent_id`` reports (see :func:`plan`); returns how many jobs changed."""
    ids = [info.job_id for info in reports]
    records = await asyncio.to_thread(db.get_many, ids) if ids else {}
    if full:
        records |= {job.job_id: job for job in await asyncio.to_thread(db.active, agent_id=agent_id)}
    todo = plan(records, reports, agent_id=agent_id, full=full, now=now)
    changed: list[JobRecord] = []
    if todo.transitions:
        applied = await asyncio.to_thread(db.apply, todo.transitions, source="agent")
        changed = [job for job in applied if job is not None]
        for job in changed:
            if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                log.info("job ended on agent: %s", job.reason, extra=job_fields(job, action="record_exit"))
    for job in todo.give_up:
        try:
            after = await give_up(db, agents.client(agent_id), job)
        except AgentError:  # refused while another agent answers at its URL: next time
            continue
        if after is not job:
            changed.append(after)
    watch.notify(changed)
    return len(changed)


async def give_up(db: RouterDB, client: AgentClient, job: JobRecord, timeout: float = 5.0) -> JobRecord:
    """A queued job its agent never started is given up by a stop, which leaves a tombstone on the
    agent so that a ``/run`` arriving even later is refused rather than started untracked. An agent
    that does not answer leaves the job as it is."""
    try:
        result = await asyncio.wait_for(client.stop(job.job_id, reason="never started"), timeout)
    except JobNotFound:  # an agent without tombstones
        result = None
    except (AgentError, TimeoutError):
        return job
    return await record_finish(
        db,
        job,
        after_never_started_stop(action=result.action if result else None, rc=result.rc if result else None),
    )


async def record_finish(db: RouterDB, job: JobRecord, finish: Finish) -> JobRecord:
    """End ``job`` as ``finish`` says; a job someone else moved first is returned as it is now."""
    try:
        done = await asyncio.to_thread(
            db.finish, job.job_id, status=finish.status, rc=finish.rc, reason=finish.reason, source="agent"
        )
    except StaleTransition:
        return await asyncio.to_thread(db.get, job.job_id) or job
    log.info("job ended on agent: %s", finish.reason, extra=job_fields(job, action="record_exit"))
    return done
