"""What agents report about many jobs at once, recorded in the router DB in one transaction.

An agent reports the jobs that changed since it last told (the loop's catch-up, ``GET
/jobs?changed_since=``, every poll interval; an agent's heartbeat). Each report is judged by the same rules
as one job's ``GET /jobs/{id}`` answer (:func:`reconciler.core.outcome.after_status`): an exit ends the job
with its status and rc, a start marks it RUNNING. A ``full`` report lists every job the agent knows,
so an active job of that agent missing from it is one the agent does not know:

- a QUEUED job past its start grace is given up (its ``/run`` may still be on the way before that:
  :func:`reconciler.core.outcome.start_grace`, from ``[fleet] submit_give_up_seconds``);
- a RUNNING job is read directly (``GET /jobs/{id}``): only the agent's own 404 for that job
  (:func:`denies`), from the process the agent's registration holds now (:func:`answering_problem`),
  ends it FAILED ("agent vm1 no longer knows this job ..."): its state directory was lost (a VM
  recreated with the same id and URL) or its retention removed an exit nobody read. A job RUNNING in
  the router DB was accepted by the agent's ``/run`` (which records it before it answers), so a job
  just submitted is never taken for a forgotten one; and any doubt (an error, a timeout, a proxy's 404
  page, another agent or another process at the URL) keeps the job and asks the agent in full again
  next time: a false end kills real work. Each job's read counts on its own: one that gives no answer
  in time keeps its job, and holds back none of the others;
- a STOPPING job is left to its stop, resumed every cycle: the agent answers a stop of a job it does
  not know with a tombstone, and the job ends with the status chosen when the stop was decided.

:func:`plan` is pure; :func:`apply_agent_reports` reads the records, confirms what the plan leaves in
doubt, applies it with :meth:`RouterDB.apply` and wakes the long-poll waiters of the jobs that changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent_api.client import AgentClient, AgentError, JobInfo, JobNotFound
from reconciler.core.outcome import (
    START_GRACE_SECONDS,
    Finish,
    GiveUp,
    MarkRunning,
    StatusOutcome,
    after_never_started_stop,
    after_status,
)
from reconciler.core.watch import JobWatch
from reconciler.fleet.agent_state import identity_problem
from reconciler.fleet.agents import AgentPool, NoAgent
from reconciler.logfields import job_fields
from router_db import AgentRecord, JobRecord, JobStatus, RouterDB, StaleTransition, Transition

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_SECONDS = 5.0  # the direct reads answer within this of the first; so does the identity check
CONFIRM_CONCURRENCY = 16  # direct reads in flight at once (a wiped agent may have forgotten many jobs)


@dataclass(frozen=True)
class Plan:
    transitions: list[Transition] = field(default_factory=list)
    give_up: list[JobRecord] = field(default_factory=list)  # QUEUED jobs the agent never started
    unknown: list[JobRecord] = field(default_factory=list)  # RUNNING jobs a full report lacks: to confirm


@dataclass(frozen=True)
class Recorded:
    """What recording a report did: how many jobs changed, and whether every doubt was settled (False:
    a job missing from a full report could not be confirmed; ask the agent in full again)."""

    changed: int
    settled: bool = True


def denies(job_id: str, exc: JobNotFound) -> bool:
    """Whether a 404 is the agent's own answer that it does not know ``job_id``: the JSON error its
    ``GET /jobs/{id}`` gives (agent/errors.py, ``UnknownJob``). A proxy's page, or a 404 for a route,
    says nothing about the job."""
    return exc.message == f"job {job_id!r} is not known to this agent"


def forgotten_reason(agent_id: str) -> str:
    return f"agent {agent_id} no longer knows this job (its state was lost or removed)"


def answering_problem(
    answer: Mapping[str, Any], *, agent_id: str, url: str, registered: AgentRecord | None
) -> str | None:
    """Why the process answering ``/healthz`` at ``url`` is not the one whose word about ``agent_id``'s
    jobs counts (None when it is). A registered agent is its registration's current process: the
    instance and the identity the router DB holds for it, as its ``/healthz`` shows them under
    ``registration`` (another copy of its home, or a VM rebuilt without its credential, names the id
    but not both). An agent in ``[[agents]]`` (no registration) has its id, and its own token, only; so
    has a registered agent older than identities, which shows neither and whose heartbeats prove none.
    The registry's call-back (:func:`reconciler.fleet.registry.call_back_problem`) compares the same
    fields."""
    problem = identity_problem(dict(answer), expected=agent_id, url=url)
    if problem is not None or registered is None:
        return problem
    shown = answer.get("registration")
    shown = shown if isinstance(shown, dict) else {}
    fingerprint, instance = shown.get("identity_fingerprint") or "", shown.get("instance")
    if not registered.identity_fingerprint and not fingerprint and instance is None:
        return None  # older than identities: it cannot be told from another process of its id
    if (fingerprint, instance) != (registered.identity_fingerprint, registered.instance):
        said = f"instance {str(instance)[:64]!r}" if isinstance(instance, str) else "no instance"
        return f"the agent at {url} is another process ({said}), not the registered {registered.instance!r}"
    return None


def plan(
    records: Mapping[str, JobRecord],
    reports: Sequence[JobInfo],
    *,
    agent_id: str,
    full: bool,
    now: datetime,
    start_grace: float = START_GRACE_SECONDS,
) -> Plan:
    """What to record for ``reports`` from ``agent_id``, given the router DB's ``records`` (of the
    reported jobs, and with ``full`` of every active job of the agent). A report of a job the router
    DB does not know, or knows on another agent, is ignored. ``start_grace``: see
    :func:`reconciler.core.outcome.start_grace`."""
    result = Plan()
    seen: set[str] = set()
    for info in reports:
        job = records.get(info.job_id)
        if job is None or job.agent_id != agent_id:
            continue
        seen.add(job.job_id)
        _judge(result, job, info, now, start_grace)
    if full:
        for job in records.values():
            if job.agent_id != agent_id or job.job_id in seen or not job.active:
                continue
            if job.status is JobStatus.RUNNING:
                result.unknown.append(job)  # ended only once the agent itself confirms it
            else:
                _judge(result, job, None, now, start_grace)
    return result


def outcome_of(job: JobRecord, info: JobInfo | None, *, now: datetime, start_grace: float) -> StatusOutcome:
    """What the agent's answer about ``job`` (None: it does not know the job) means for the router DB.
    ``now``: the router DB's time, which wrote ``created_at`` (this replica's clock may be off)."""
    return after_status(
        job.status,
        info.status if info else None,
        rc=info.rc if info else None,
        reason=info.reason if info else None,
        queued_for=(now - job.created_at).total_seconds(),
        start_grace=start_grace,
    )


def _judge(result: Plan, job: JobRecord, info: JobInfo | None, now: datetime, start_grace: float) -> None:
    outcome = outcome_of(job, info, now=now, start_grace=start_grace)
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
    start_grace: float = START_GRACE_SECONDS,
) -> Recorded:
    """Record what ``agent_id`` reports (see :func:`plan`)."""
    ids = [info.job_id for info in reports]
    records = await asyncio.to_thread(db.get_many, ids) if ids else {}
    if full:
        records |= {job.job_id: job for job in await asyncio.to_thread(db.active, agent_id=agent_id)}
    todo = plan(records, reports, agent_id=agent_id, full=full, now=now, start_grace=start_grace)
    transitions = list(todo.transitions)
    settled = True
    if todo.unknown:
        forgotten, known, settled = await confirm_unknown(db, agents, agent_id, todo.unknown)
        # Known after all (it changed since the report): judged as any report of it.
        transitions += plan(records, known, agent_id=agent_id, full=False, now=now).transitions
        reason = forgotten_reason(agent_id)
        transitions += [
            Transition.finish(job.job_id, JobStatus.FAILED, None, reason, expect=JobStatus.RUNNING)
            for job in forgotten
        ]
    changed: list[JobRecord] = []
    if transitions:
        applied = await asyncio.to_thread(db.apply, transitions, source="agent")
        changed = [job for job in applied if job is not None]
        for job in changed:
            if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                log.info("job ended on agent: %s", job.reason, extra=job_fields(job, action="record_exit"))
        lost = [job for job in changed if job.reason == forgotten_reason(agent_id)]
        if lost:
            log.error(
                "agent %s no longer knows %d running job(s) (its state directory was lost or its retention "
                "removed them): ended FAILED",
                agent_id,
                len(lost),
                extra={"agent_id": agent_id, "action": "agent_forgot_jobs"},
            )
    for job in todo.give_up:
        try:
            after = await give_up(db, agents.client(agent_id), job)
        except (AgentError, NoAgent):  # refused while another agent answers at its URL: next time
            continue
        if after is not job:
            changed.append(after)
    watch.notify(changed)
    return Recorded(len(changed), settled)


async def confirm_unknown(
    db: RouterDB, agents: AgentPool, agent_id: str, jobs: Sequence[JobRecord]
) -> tuple[list[JobRecord], list[JobInfo], bool]:
    """Read each of ``jobs`` (RUNNING, missing from the agent's full report) directly from the agent:
    ``(forgotten, known, settled)``. Forgotten: the agent's own 404, and then its ``/health`` shows the
    process its registration holds (:func:`answering_problem`). Known: it answered the job after all.
    ``settled`` False when a read, or the identity check, gave no certain answer: that job is kept.

    Each read has until :data:`CONFIRM_TIMEOUT_SECONDS` after the first is sent: a job whose read is
    slower (a hung connection, an agent overloaded by a wiped state's many forgotten jobs) waits for the
    next full answer, and the others are settled meanwhile rather than held back by it."""
    try:
        client = agents.client(agent_id)  # refused while another agent answers at its URL
    except (AgentError, NoAgent) as exc:
        log.warning("agent %s: cannot confirm %d missing job(s) now: %s", agent_id, len(jobs), exc)
        return [], [], False
    timeout = CONFIRM_TIMEOUT_SECONDS
    clock = asyncio.get_running_loop()
    deadline = clock.time() + timeout
    slots = asyncio.Semaphore(CONFIRM_CONCURRENCY)

    async def read(job: JobRecord) -> JobInfo | bool | None:
        """The agent's answer; True: it denies the job; False: no certain answer; None: none in time."""
        async with slots:
            if clock.time() >= deadline:
                return None  # not even sent: asked next time
            try:
                async with asyncio.timeout_at(deadline):
                    return await client.get(job.job_id)
            except TimeoutError:
                return None
            except JobNotFound as exc:
                if denies(job.job_id, exc):
                    return True
                log.warning(
                    "agent %s: a 404 that is not the agent's own: %s", agent_id, exc, extra=job_fields(job)
                )
            except AgentError as exc:
                log.warning(
                    "agent %s: cannot confirm a missing job: %s", agent_id, exc, extra=job_fields(job)
                )
            return False

    answers = await asyncio.gather(*(read(job) for job in jobs))
    denied = [job for job, answer in zip(jobs, answers, strict=True) if answer is True]
    known = [answer for answer in answers if isinstance(answer, JobInfo)]
    settled = all(answer is not False and answer is not None for answer in answers)
    if late := sum(answer is None for answer in answers):
        log.warning(
            "agent %s: %d of %d missing job(s) not confirmed within %g s; asked again next time",
            agent_id,
            late,
            len(jobs),
            timeout,
        )
    if denied:
        # The 404s came from whoever answers at the URL now: they count only from the agent itself.
        try:
            problem = await asyncio.wait_for(_answering(db, agents, agent_id, client.base_url), timeout)
        except (AgentError, NoAgent, TimeoutError) as exc:
            problem = str(exc) or f"no answer within {timeout:g} s"
        if problem is not None:
            log.warning("agent %s: %s; its %d missing job(s) are kept", agent_id, problem, len(denied))
            return [], known, False
    return denied, known, settled


async def _answering(db: RouterDB, agents: AgentPool, agent_id: str, url: str) -> str | None:
    """:func:`answering_problem` of the process answering at ``url`` now: its ``/health``, then the
    registration the router DB holds (read after: a registration that changed meanwhile differs)."""
    answer = await agents.prober(agent_id).health()
    registered = await asyncio.to_thread(db.registered_agent, agent_id)
    return answering_problem(answer, agent_id=agent_id, url=url, registered=registered)


async def give_up(db: RouterDB, client: AgentClient, job: JobRecord, timeout: float = 5.0) -> JobRecord:
    """A queued job its agent never started is given up by a stop, which leaves a tombstone on the
    agent so that a ``/run`` arriving even later is refused rather than started untracked. An agent
    that does not answer leaves the job as it is."""
    try:
        result = await asyncio.wait_for(client.stop(job.job_id, reason="never started"), timeout)
    except JobNotFound as exc:
        if not denies(job.job_id, exc):  # a proxy's 404: no answer
            return job
        result = None  # an agent without tombstones
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
