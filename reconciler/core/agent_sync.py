"""The reverse direction: what the agents know that the router DB does not yet (jobs that exited).

Each round (:meth:`AgentSync.round`) catches up with the agents (:mod:`reconciler.core.catch_up`): one
request per agent that has queued or running jobs, recording every exit it reports; an agent without
that feed gets the rolling *sweep* instead, ``agent_sync_per_cycle`` job reads a round in job-id order
(:func:`refresh_from_agent`), so agents see a bounded load however many jobs are active. The running
loop's rounds run on their own clock (:meth:`AgentSync.run`: every poll interval, or every
``agent_catch_up_seconds`` if that is shorter, the sweep once an interval), each in a task of its own
unless the previous one still runs: an agent that does not answer holds its reads for their timeout,
and no read of Airflow waits for that; a slow Airflow, which makes cycles long, delays no exit an
agent's change feed reports (the sweep reads the jobs the last cycle knew).

First of all, a cycle ends the active jobs of agents it can no longer address
(:meth:`AgentSync.end_unaddressable`): neither in ``[[agents]]`` nor registered (the router DB's
``agents`` table, read directly: a replica that has not loaded a registered agent yet still knows
it). No stop or status read can ever reach such a job, so its task would wait forever. An agent must
stay missing for ``lost_after_seconds`` first: a config rendered half, or an agent moving from
``[[agents]]`` to registration, must not end jobs that still run. The price: a sidecar started with an
entry removed by mistake ends that agent's jobs then, and says so in an error naming the agents and
how many jobs each.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from agent_api.client import AgentError, JobInfo, JobNotFound
from reconciler.core.agent_reports import (
    Recorded,
    apply_agent_reports,
    denies,
    give_up,
    outcome_of,
    record_finish,
)
from reconciler.core.catch_up import CatchUp
from reconciler.core.db_time import DbTime
from reconciler.core.gather import bounded
from reconciler.core.outcome import START_GRACE_SECONDS, Finish, GiveUp, MarkRunning
from reconciler.core.watch import JobWatch
from reconciler.fleet.agent_state import AgentState
from reconciler.fleet.agents import AgentPool, NoAgent, unconfigured_reason, unconfigured_transition
from reconciler.fleet.liveness import Fleet
from reconciler.logfields import job_fields
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, RouterDB, StaleTransition

log = logging.getLogger("reconciler.core.agent_sync")

AGENT_READ_CONCURRENCY = 16  # status reads of the rolling sweep in flight at once
SLOW_ROUND_SECONDS = 60.0  # a round with the agents running longer than this is logged as an error


class AgentSync:
    def __init__(
        self,
        *,
        db: RouterDB,
        agents: AgentPool,
        watch: JobWatch,
        metrics: Metrics,
        fleet: Fleet | None,
        sweep_per_round: int,
        interval_seconds: float,
        catch_up_seconds: float,
        unaddressable_grace_seconds: float,
        start_grace_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._agents = agents
        self._watch = watch
        self._metrics = metrics
        self._fleet = fleet
        self._sweep_per_round = sweep_per_round
        self._interval = interval_seconds
        self._period = min(interval_seconds, catch_up_seconds)  # between rounds
        # Rounds more often than cycles (catch_up_seconds shorter), or a cycle's list older than a round
        # (a slow Airflow): the agents are read fresh from the router DB; otherwise the list serves.
        self._fresh_agents = catch_up_seconds < interval_seconds
        self._last_sweep = float("-inf")  # the sweep and a failure's count: at most once an interval
        self._last_counted = float("-inf")
        self._clock = clock
        # A QUEUED job its agent does not know is given up only this long after its submission: the
        # bound its submission keeps ([fleet] submit_give_up_seconds, plus one /run's timeout).
        self._start_grace = start_grace_seconds
        self._unaddressable_grace = unaddressable_grace_seconds
        self._missing_since: dict[str, float] = {}  # agent id -> when this process first missed it
        self._db_time = DbTime(db.now, clock=clock)  # a queued job's age, on the clock that wrote it
        self.catch_up = CatchUp(agents, self._apply_reports, clock=clock)
        self._sweep_cursor = ""  # job id up to which the rolling sweep has got
        self._round: asyncio.Task[None] | None = None  # the running loop's round, in a task of its own
        self._round_since = 0.0  # when that round started (or was last said to be slow)

    def answering(self, agent_id: str) -> bool:
        """False while this replica sees the agent fail its health checks (suspect or lost)."""
        return self._fleet is None or self._fleet.state(agent_id) is AgentState.LIVE

    def restart(self) -> None:
        """A new term: every agent answers in full."""
        self.catch_up.restart()
        self._round = None

    async def stop(self) -> None:
        """End the round under way (the term ends)."""
        if self._round is not None:
            self._round.cancel()
            await asyncio.gather(self._round, return_exceptions=True)
            self._round = None

    async def run(
        self,
        stopping: asyncio.Event,
        *,
        jobs: Callable[[], Sequence[JobRecord]],
        read_at: Callable[[], float],
    ) -> None:
        """Rounds on their own clock, every ``period_seconds``, each in a task of its own unless the
        previous one still runs: neither a slow read of Airflow nor a long cycle delays recording the
        jobs' exits, and an agent that does not answer delays no read of Airflow. ``jobs``: the active
        jobs as the last cycle read them, at ``read_at`` (``clock`` time)."""
        while not stopping.is_set():
            if self._round is None or self._round.done():
                # A cycle late (a slow Airflow): jobs submitted since may be missing from its list.
                stale = self._clock() - read_at() > 2 * self._interval
                self._round = asyncio.create_task(self._round_apart(jobs(), fresh=stale), name="agent-sync")
                self._round_since = self._clock()
            elif self._clock() - self._round_since > SLOW_ROUND_SECONDS:
                # Its reads are bounded (a few seconds each): a round this long waits on something
                # else, a router DB call say, and no exit is recorded meanwhile.
                self._round_since = self._clock()  # said once a period
                log.error(
                    "a round with the agents has run over %.0f s; exits wait for it", SLOW_ROUND_SECONDS
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self._period)

    async def round(
        self, jobs: Sequence[JobRecord], agents: Collection[str] | None = None, *, sweeps: bool = True
    ) -> None:
        """Catch up with ``agents`` (default: those of the live jobs); sweep a few jobs of agents without
        the feed (``sweeps``: the sweep's share is one a poll interval, however often rounds come)."""
        answering = [
            job for job in jobs if job.status is not JobStatus.STOPPING and self.answering(job.agent_id)
        ]
        if agents is None:
            agents = {job.agent_id for job in answering}
        without_feed = set(await self.catch_up.run(sorted(a for a in agents if self.answering(a))))
        if sweeps:
            self._last_sweep = self._clock()
            await self.sweep(self._next_to_sweep([j for j in answering if j.agent_id in without_feed]))

    async def _round_apart(self, jobs: Sequence[JobRecord], *, fresh: bool = False) -> None:
        """A round beside the cycles. Its failures count as a failed cycle's would, at most once an
        interval (rounds may come more often than cycles; a router DB down fails the cycles too)."""
        try:
            agents = None
            if fresh or self._fresh_agents:  # a job submitted since the last cycle counts
                load = await asyncio.to_thread(self._db.active_counts)
                agents = {a for a, n in load.items() if n}
            await self.round(jobs, agents, sweeps=self._clock() - self._last_sweep >= self._interval)
        except Exception as exc:
            result = "db_error" if isinstance(exc, SQLAlchemyError) else "error"
            if self._clock() - self._last_counted < self._interval:
                log.warning("hearing the agents failed again: %s", type(exc).__name__)
                return
            self._last_counted = self._clock()
            self._metrics.cycles.labels(result).inc()
            if result == "db_error":  # the next round tries again
                log.error(
                    "router DB unusable hearing the agents: %s", type(exc).__name__, extra={"error": str(exc)}
                )
            else:
                log.exception("hearing the agents failed", extra={"error": str(exc)})

    async def sweep(self, jobs: Sequence[JobRecord]) -> None:
        """Ask each job's agent about it and record what it says."""
        if not jobs:
            return
        now = await self._db_time.now()
        fresh = await bounded(
            AGENT_READ_CONCURRENCY,
            [
                refresh_from_agent(self._db, self._agents, job, now=now, start_grace=self._start_grace)
                for job in jobs
            ],
        )
        self._watch.notify(after for before, after in zip(jobs, fresh, strict=True) if after is not before)

    def _next_to_sweep(self, live: Sequence[JobRecord]) -> list[JobRecord]:
        """The next few jobs of the rolling sweep in job-id order."""
        after = [job for job in live if job.job_id > self._sweep_cursor]
        batch = heapq.nsmallest(self._sweep_per_round, after, key=lambda job: job.job_id)
        self._sweep_cursor = batch[-1].job_id if batch else ""  # wrap around after the last job
        return batch

    async def _apply_reports(self, agent_id: str, jobs: Sequence[JobInfo], full: bool) -> Recorded:
        return await apply_agent_reports(
            self._db,
            self._agents,
            self._watch,
            agent_id,
            jobs,
            full=full,
            now=await self._db_time.now(),
            start_grace=self._start_grace,
        )

    async def known_agents(self) -> set[str]:
        """The agents this sidecar can address or another replica may: its pool's (``[[agents]]`` and
        the registered agents loaded so far) and every agent registered in the router DB (counted
        whatever this replica's own registration setting: another replica may hold the fleet token)."""
        known = set(self._agents.ids())
        known.update(row.agent_id for row in await asyncio.to_thread(self._db.registered_agents))
        return known

    async def end_unaddressable(self, jobs: Sequence[JobRecord], *, dry_run: bool) -> list[JobRecord]:
        """End the active jobs of agents no longer configured nor registered (see the module's
        docstring); returns the other jobs."""
        if not {job.agent_id for job in jobs} - set(self._agents.ids()):
            return list(jobs)  # the common case: no router DB read
        known = await self.known_agents()
        now = self._clock()
        missing = {job.agent_id for job in jobs if job.agent_id not in known}
        self._missing_since = {a: self._missing_since.get(a, now) for a in missing}
        due = {a for a in missing if now - self._missing_since[a] >= self._unaddressable_grace}
        ending = [job for job in jobs if job.agent_id in due]
        if not ending:
            return list(jobs)
        counts = Counter(job.agent_id for job in ending)
        named = ", ".join(f"{agent_id} ({n} job(s))" for agent_id, n in sorted(counts.items()))
        fields = {"action": "end_unconfigured", "agent_ids": sorted(counts)}
        if dry_run:
            log.error("would end the active jobs of agents no longer configured: %s", named, extra=fields)
        else:
            log.error(
                "agents no longer configured (not in [[agents]] and not registered): ending their active "
                "jobs FAILED: %s. If an entry was removed by mistake, put it back: jobs already ended "
                "stay ended",
                named,
                extra=fields,
            )
            ended = await asyncio.to_thread(
                self._db.apply, [unconfigured_transition(job) for job in ending], source="reconciler"
            )
            self._watch.notify(job for job in ended if job is not None)
            for job in ended:
                if job is not None:
                    log.info(
                        "%s",
                        unconfigured_reason(job.agent_id),
                        extra=job_fields(job, action="end_unconfigured"),
                    )
        return [job for job in jobs if job.agent_id not in due]


async def refresh_from_agent(
    db: RouterDB,
    agents: AgentPool,
    job: JobRecord,
    *,
    timeout: float = 5.0,
    now: datetime | None = None,
    start_grace: float = START_GRACE_SECONDS,
) -> JobRecord:
    """Ask the job's agent about a queued or running job and record what it reports: the rolling
    sweep of agents without the change feed. An unreachable agent, or a 404 that is not the agent's
    own (:func:`~reconciler.core.agent_reports.denies`), leaves the record as it is. ``start_grace``: see
    :func:`reconciler.core.outcome.start_grace`.
    """
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return job
    try:
        client = agents.client(job.agent_id)  # refused while another agent answers at its URL
        info = await asyncio.wait_for(client.get(job.job_id), timeout)
    except JobNotFound as exc:
        if not denies(job.job_id, exc):  # a proxy's 404, a route an older agent lacks: no answer
            return job
        info = None
    except (AgentError, TimeoutError):
        return job
    except NoAgent:  # no longer configured nor registered: the cycle ends the job
        return job
    if now is None:
        now = await asyncio.to_thread(db.now)
    outcome = outcome_of(job, info, now=now, start_grace=start_grace)
    if isinstance(outcome, Finish):
        return await record_finish(db, job, outcome)
    if isinstance(outcome, MarkRunning):
        try:
            return await asyncio.to_thread(db.mark_running, job.job_id, source="agent")
        except StaleTransition:
            return job
    if isinstance(outcome, GiveUp):
        return await give_up(db, client, job, timeout)
    return job
