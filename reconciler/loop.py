"""The poll loop: read task-instance states, decide, confirm, and hand stops to the dispatcher.

How a cycle reads Airflow is ``[poll] strategy``: ``targeted`` (the default, :mod:`reconciler.targeted`)
reads only the active jobs' task instances that left ``deferred``; ``incremental`` asks for every
task instance updated since the previous read, with a full batch read every ``full_resync_seconds``;
``batch`` makes that full read every cycle; ``naive`` reads each job's task instance directly. Each
would-be stop is re-read directly before it is acted on. Airflow errors keep every job: uncertainty
never stops one.

Beside Airflow, each cycle catches up with the agents (:mod:`reconciler.catch_up`): one request per
agent that has queued or running jobs, recording every exit it reports; an agent without that feed
gets the rolling sweep of ``agent_sync_per_cycle`` job reads a cycle instead. The running loop does
this in a task of its own, a round each cycle unless the previous one still runs, so that an agent
that does not answer (its reads wait for their timeout) never delays the next read of Airflow.

First of all, a cycle ends the active jobs of agents it can no longer address: neither in
``[[agents]]`` nor registered (the router DB's ``agents`` table, read directly: a replica that has
not loaded a registered agent yet still knows it; its rows count only while registration is on). No
stop or status read can ever reach such a job, so its task would wait forever. The price: a sidecar
started with an entry removed by mistake ends that agent's jobs at its first cycle, and says so in an
error naming the agents and how many jobs each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from agent_api.client import JobInfo
from agent_api.fencing import FenceTerms
from reconciler.agent_reports import Recorded, apply_agent_reports
from reconciler.agents import AgentPool, unconfigured_reason, unconfigured_transition
from reconciler.airflow import REFUSALS, AirflowError, TaskInstancePath, TaskInstanceReader
from reconciler.catch_up import CatchUp
from reconciler.config import PollConfig
from reconciler.db_time import DbTime
from reconciler.decision import MAX_NOTE_CHARS, Absent, Keep, Observation, Stop, Unknown
from reconciler.fleet import AgentState, Fleet
from reconciler.job_service import refresh_from_agent
from reconciler.logfields import job_fields
from reconciler.metrics import Metrics
from reconciler.outcome import START_GRACE_SECONDS
from reconciler.stops import StopDispatcher
from reconciler.targeted import TargetedRead, judge, observe, ti_key
from reconciler.watch import JobWatch
from router_db import JobRecord, JobStatus, RouterDB

log = logging.getLogger("reconciler.loop")

AGENT_READ_CONCURRENCY = 16  # status reads of the rolling agent sweep in flight at once
SLOW_ROUND_SECONDS = 60.0  # a round with the agents running longer than this is logged as an error
T = TypeVar("T")


@dataclass
class CycleReport:
    result: str = "ok"
    read: str = ""  # "targeted" (+locate, +check), "incremental", "full" or "naive"
    active: int = 0
    candidates: int = 0  # jobs whose observation this cycle would stop them, before confirmation
    stops: list[tuple[JobRecord, Stop]] = field(default_factory=list)
    unconfirmed: int = 0


class ReconcileLoop:
    def __init__(
        self,
        *,
        db: RouterDB,
        airflow: TaskInstanceReader,
        agents: AgentPool,
        dispatcher: StopDispatcher,
        metrics: Metrics,
        poll: PollConfig,
        fleet: Fleet | None = None,
        watch: JobWatch | None = None,
        unconfigured_grace_seconds: float = 0.0,
        start_grace_seconds: float = START_GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        # This process's clocks: intervals on ``clock`` (monotonic), Airflow watermarks on ``wall``.
        self._clock, self._wall = clock, wall
        self._db = db
        # A QUEUED job its agent does not know is given up only this long after its submission: the
        # bound its submission keeps ([fleet] submit_give_up_seconds, plus one /run's timeout).
        self._start_grace = start_grace_seconds
        self._fleet = fleet
        # An agent missing from the config must stay missing this long (the lost rule's bound) before
        # its jobs end: a config rendered half, or an agent moving from [[agents]] to registration,
        # must not end jobs that still run.
        self._unconfigured_grace = unconfigured_grace_seconds
        self._missing_since: dict[str, float] = {}  # agent id -> when this process first missed it
        # A queued job's age is measured on the clock that wrote it.
        self._db_time = DbTime(db.now, clock=clock)
        # The long-poll waiters of this process: the catch-up's and the sweep's changes wake them.
        self.watch = watch or JobWatch(db, period=poll.watch_seconds)
        self.catch_up = CatchUp(agents, self._apply_reports, clock=clock)
        self._airflow = airflow
        self._agents = agents
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._poll = poll
        self._watermark: datetime | None = None  # start of the last successful Airflow read (our clock)
        # Active jobs, kept current from the router DB's recently-changed rows: a cycle does not
        # reload tens of thousands of jobs; a full resync does.
        self._jobs: dict[str, JobRecord] = {}
        self._jobs_read: datetime | None = None
        self._next_full = float("-inf")  # monotonic time the next full read (targeted: job reload) is due
        self._next_full_attempt = float("-inf")  # targeted: when to try again a read Airflow refused
        self._full_failures = 0  # consecutive failed full reads (they back off, incrementals go on)
        self.full_read_error: str | None = None  # why the last full read failed, while it keeps failing
        self._sync_cursor = ""  # job id up to which the rolling agent sweep has got
        self._ended: list[JobRecord] = []  # jobs that left the active set since the previous cycle
        self._syncing: asyncio.Task[None] | None = None  # the running loop's round with the agents
        self._syncing_since = 0.0  # when that round started (or was last said to be slow)
        self.targeted = TargetedRead(
            airflow,
            full_check_seconds=poll.full_resync_seconds,
            concurrency=poll.max_concurrent_reads,
            clock=clock,
            on_request=lambda read: metrics.targeted_reads.labels(read).inc(),
        )
        self.last_success: float | None = None  # monotonic time of the last successful cycle

    @property
    def fleet(self) -> Fleet | None:
        """The agents' liveness and capacity as this replica knows them (None: not watched)."""
        return self._fleet

    def agent_states(self) -> dict[str, str]:
        """Each agent's liveness (live, suspect, lost) as this replica's loop sees it."""
        return {} if self._fleet is None else {a: str(s) for a, s in self._fleet.states().items()}

    def fence_refusal(self, agent_id: str, *, at_most_once: bool) -> str | None:
        """Why a job must not go to the agent for its fence (reconciler.fleet.Fleet.fence_refusal)."""
        return None if self._fleet is None else self._fleet.fence_refusal(agent_id, at_most_once=at_most_once)

    def fence_terms(self, agent_id: str) -> FenceTerms | None:
        """The agent's fence terms as last said (None: not said)."""
        return None if self._fleet is None else self._fleet.fence_terms(agent_id)

    def answering(self, agent_id: str) -> bool:
        """False while this replica's loop sees the agent fail its health checks (suspect or lost)."""
        return self._fleet is None or self._fleet.state(agent_id) is AgentState.LIVE

    def known_jobs(self) -> list[JobRecord]:
        """The active jobs as of the last cycle (the loop's view of the router DB)."""
        return list(self._jobs.values())

    async def run(self, stopping: asyncio.Event) -> None:
        # A new term starts from scratch: what an earlier term read is stale (another replica led
        # meanwhile), so the first cycle reloads the jobs and reads everything again.
        self._watermark, self._jobs_read, self._jobs, self._syncing = None, None, {}, None
        self._next_full = self._next_full_attempt = float("-inf")
        self.targeted.restart()
        self.catch_up.restart()
        self._metrics.leader.set(1)
        # Agent liveness runs beside the cycles, on its own clock; a new term counts from now.
        fleet = asyncio.create_task(self._fleet.run(stopping)) if self._fleet is not None else None
        between = self._poll.agent_catch_up_seconds < self._poll.interval_seconds
        catching = asyncio.create_task(self._catch_up_between_cycles(stopping)) if between else None
        try:
            while not stopping.is_set():
                started = self._clock()
                await self.cycle(agents_apart=True)
                delay = max(0.0, self._poll.interval_seconds - (self._clock() - started))
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            background = [task for task in (fleet, catching, self._syncing) if task is not None]
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self._metrics.leader.set(0)
            self._metrics.full_resync_failing.set(0)  # a standby reads nothing: no stale alert

    async def cycle(self, *, dry_run: bool = False, agents_apart: bool = False) -> CycleReport:
        """One reconciliation pass. With ``dry_run`` it reads and decides but changes nothing.

        ``agents_apart`` (the running loop's): the pass hears the agents in a task of its own, started
        unless the previous one still runs, and reads Airflow without waiting for it. A cut-off agent
        holds its reads for their timeout; the next read of Airflow must not wait for that."""
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
        if self._poll.strategy == "targeted":
            # The targeted read has no full read of its own: "full" reloads the job view.
            full = self._clock() >= self._next_full
            if full:
                self._next_full = self._clock() + self._poll.full_resync_seconds
        else:
            full = (
                self._poll.strategy == "batch" or self._watermark is None or self._clock() >= self._next_full
            )
        jobs = await self._end_unconfigured(await self._active_jobs(reload=full), dry_run=dry_run)
        self._metrics.active_jobs.set(len(jobs))
        self._metrics.stopping_jobs.set(sum(job.status is JobStatus.STOPPING for job in jobs))
        report = CycleReport(active=len(jobs))
        live = [j for j in jobs if j.status is not JobStatus.STOPPING]
        if dry_run:
            await self._against_airflow(live, report, full=full, dry_run=True)
            return report
        for job in jobs:
            self._dispatcher.resume(job)  # finishes stops left pending by a crash or an outage
        # Agent bookkeeping (exits, liveness, orphans) never waits for Airflow, nor Airflow for it.
        if agents_apart:
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.create_task(self._bookkeeping_apart(jobs), name="agent-sync")
                self._syncing_since = self._clock()
            elif self._clock() - self._syncing_since > SLOW_ROUND_SECONDS:
                # Its reads are bounded (a few seconds each): a round this long waits on something
                # else, a router DB call say, and no exit is recorded meanwhile.
                self._syncing_since = self._clock()  # said once a period
                log.error(
                    "a round with the agents has run over %.0f s; exits wait for it", SLOW_ROUND_SECONDS
                )
            await self._against_airflow(live, report, full=full, dry_run=False)
            return report
        outcomes = await asyncio.gather(
            self._bookkeeping(jobs),
            self._against_airflow(live, report, full=full, dry_run=False),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return report

    async def _bookkeeping(self, jobs: Sequence[JobRecord]) -> None:
        answering = [
            job for job in jobs if job.status is not JobStatus.STOPPING and self.answering(job.agent_id)
        ]
        # One change-feed request per agent with live jobs; the jobs of agents without the feed are
        # read one by one, a few a cycle.
        without_feed = set(await self.catch_up.run(sorted({job.agent_id for job in answering})))
        await self.sync_from_agents(self._next_to_sync([j for j in answering if j.agent_id in without_feed]))

    async def _bookkeeping_apart(self, jobs: Sequence[JobRecord]) -> None:
        """A round with the agents beside the cycles; its failures count as a failed cycle's would."""
        try:
            await self._bookkeeping(jobs)
        except SQLAlchemyError as exc:  # the next cycle's round tries again
            log.error(
                "router DB unusable hearing the agents: %s", type(exc).__name__, extra={"error": str(exc)}
            )
            self._metrics.cycles.labels("db_error").inc()
        except Exception as exc:
            log.exception("hearing the agents failed", extra={"error": str(exc)})
            self._metrics.cycles.labels("error").inc()

    async def _catch_up_between_cycles(self, stopping: asyncio.Event) -> None:
        """The agents' catch-up at its own pace while cycles are further apart (a long interval that
        spares Airflow must not delay recording the jobs' exits)."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self._poll.agent_catch_up_seconds)
            if stopping.is_set():
                return
            try:
                load = await asyncio.to_thread(self._db.active_counts)
                await self.catch_up.run(sorted(a for a, n in load.items() if n and self.answering(a)))
            except Exception as exc:  # the router DB is down: the next round, or the cycle, tries again
                log.warning("catching up with the agents failed: %s", type(exc).__name__)

    async def known_agents(self) -> set[str]:
        """The agents this sidecar can address or another replica may: its pool's (``[[agents]]`` and
        the registered agents loaded so far) and every agent registered in the router DB (counted
        whatever this replica's own registration setting: another replica may hold the fleet token)."""
        known = set(self._agents.ids())
        known.update(row.agent_id for row in await asyncio.to_thread(self._db.registered_agents))
        return known

    async def _end_unconfigured(self, jobs: Sequence[JobRecord], *, dry_run: bool) -> list[JobRecord]:
        """End the active jobs of agents no longer configured nor registered (see the module's
        docstring); returns the other jobs."""
        if not {job.agent_id for job in jobs} - set(self._agents.ids()):
            return list(jobs)  # the common case: no router DB read
        known = await self.known_agents()
        now = self._clock()
        missing = {job.agent_id for job in jobs if job.agent_id not in known}
        self._missing_since = {a: self._missing_since.get(a, now) for a in missing}
        due = {a for a in missing if now - self._missing_since[a] >= self._unconfigured_grace}
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
            self.watch.notify(job for job in ended if job is not None)
            for job in ended:
                if job is not None:
                    log.info(
                        "%s",
                        unconfigured_reason(job.agent_id),
                        extra=job_fields(job, action="end_unconfigured"),
                    )
        return [job for job in jobs if job.agent_id not in due]

    async def _apply_reports(self, agent_id: str, jobs: Sequence[JobInfo], full: bool) -> Recorded:
        return await apply_agent_reports(
            self._db,
            self._agents,
            self.watch,
            agent_id,
            jobs,
            full=full,
            now=await self._db_time.now(),
            start_grace=self._start_grace,
        )

    async def _against_airflow(
        self, live: Sequence[JobRecord], report: CycleReport, *, full: bool, dry_run: bool
    ) -> None:
        observations = await self._read(live, report, full=full)
        report.candidates = len(observations)
        suspects = [
            job
            for job in live
            if job.job_id in observations and isinstance(judge(job, observations[job.job_id]), Stop)
        ]
        verdicts = await _bounded(self._poll.max_concurrent_reads, [self._confirm(job) for job in suspects])
        report.stops = [(job, verdict) for job, verdict in zip(suspects, verdicts, strict=True) if verdict]
        report.unconfirmed = len(suspects) - len(report.stops)
        if report.stops and not dry_run:
            await self._dispatcher.stop_many(report.stops, source="reconciler")

    def _next_to_sync(self, live: Sequence[JobRecord]) -> list[JobRecord]:
        """The next few jobs of a rolling sweep in job-id order, so agents see a bounded load
        however many jobs are active (the operator's trigger reports exits sooner anyway)."""
        after = [job for job in live if job.job_id > self._sync_cursor]
        batch = heapq.nsmallest(self._poll.agent_sync_per_cycle, after, key=lambda job: job.job_id)
        self._sync_cursor = batch[-1].job_id if batch else ""  # wrap around after the last job
        return batch

    async def _active_jobs(self, *, reload: bool) -> list[JobRecord]:
        # Router DB time, as every replica writes updated_at: this replica's own clock never enters.
        if reload or self._jobs_read is None:
            read_started = await asyncio.to_thread(self._db.now)
            previous = self._jobs
            self._jobs = {job.job_id: job for job in await asyncio.to_thread(self._db.active)}
            gone = [job_id for job_id in previous if job_id not in self._jobs]
            if gone and self._poll.strategy == "targeted":  # their records as they ended, for its bookkeeping
                fresh = await asyncio.to_thread(self._db.get_many, gone)
                self._ended.extend(fresh.get(job_id, previous[job_id]) for job_id in gone)
        else:
            # The overlap covers a writer whose transaction took its time before this read began and
            # committed after.
            since = self._jobs_read - timedelta(seconds=self._poll.overlap_seconds)
            read_started, changed = await asyncio.to_thread(self._db.changes_since, since)
            for job in changed:
                if job.active:
                    self._jobs[job.job_id] = job
                elif self._jobs.pop(job.job_id, None) is not None and self._poll.strategy == "targeted":
                    self._ended.append(job)
        self._jobs_read = read_started
        return list(self._jobs.values())

    async def _read(
        self, live: Sequence[JobRecord], report: CycleReport, *, full: bool
    ) -> dict[str, Observation]:
        """Observations of the live jobs this cycle can see; a job left out is unchanged."""
        read_started = self._wall()
        if self._poll.strategy == "targeted":
            self.targeted.ended(self._ended)
            self._ended.clear()
            if self._clock() >= self._next_full_attempt:
                try:
                    found, report.read = await self.targeted.read(live)
                    self._metrics.targeted_surplus.set(self.targeted.surplus)
                except AirflowError as exc:
                    self.targeted.missed()
                    if exc.status not in REFUSALS:
                        self._watermark = self._watermark or read_started
                        raise  # Airflow unwell: keep every job, try again next cycle
                    self._full_read_failed(exc)
                    if self._watermark is None:
                        # Nothing read yet: what changed from here on is read while Airflow refuses.
                        self._watermark = read_started
                        raise
                else:
                    self._read_works_again()
                    self._watermark = read_started
                    return found
            # The batch endpoint refuses these reads: read what changed, as "incremental" does.
            report.read = "incremental (targeted read refused)"
            return await self._changed(live, read_started)
        if self._poll.strategy == "naive":
            report.read = "naive"
            tis = await _bounded(self._poll.max_concurrent_reads, [self._direct(job) for job in live])
            return {job.job_id: obs for job, obs in zip(live, tis, strict=True)}
        if full or self._watermark is None:
            report.read = "full"
            try:
                found = await self._full_read(live)
            except AirflowError as exc:
                self._full_read_failed(exc)
                if self._watermark is None:
                    # Nothing read yet: incremental reads start from here; the full read, when it
                    # works again, finds what changed before.
                    self._watermark = read_started
                    raise
                report.read = "incremental (full read failing)"
            else:
                self._read_works_again()
                self._next_full = self._clock() + self._poll.full_resync_seconds
                self._watermark = read_started
                return found
        else:
            report.read = "incremental"
        return await self._changed(live, read_started)

    async def _changed(self, live: Sequence[JobRecord], read_started: datetime) -> dict[str, Observation]:
        """The live jobs' task instances updated since the previous read (less the overlap)."""
        since = (self._watermark or read_started) - timedelta(seconds=self._poll.overlap_seconds)
        changed = {ti.key: ti for ti in await self._airflow.changed_since(since)}
        self._watermark = read_started
        return {job.job_id: observe(changed[ti_key(job)]) for job in live if ti_key(job) in changed}

    async def _full_read(self, live: Sequence[JobRecord]) -> dict[str, Observation]:
        """Every live job's task instance through the batch endpoint; a job whose task instance is
        not in the answer is absent (its run or task instance was deleted)."""
        if not live:
            await self._airflow.ping()  # nothing to read, but readiness must mean "Airflow answers"
            return {}
        # Several jobs may share a task-instance key (two tries, or a run deleted and created again):
        # each is checked. Page by page, keeping only what could stop a job: a full read of 100k task
        # instances must not hold them all at once.
        unseen: dict[TaskInstancePath, list[JobRecord]] = {}
        for job in live:
            unseen.setdefault(ti_key(job), []).append(job)
        found: dict[str, Observation] = {}
        async for page in self._airflow.task_instance_pages(
            dag_ids={j.key.dag_id for j in live},
            run_ids={j.key.run_id for j in live},
            task_ids={j.key.task_id for j in live},
        ):
            for ti in page:
                for job in unseen.pop(ti.key, ()):
                    if isinstance(judge(job, observe(ti)), Stop):
                        found[job.job_id] = observe(ti)
        found.update((job.job_id, Absent()) for jobs in unseen.values() for job in jobs)
        return found

    def _read_works_again(self) -> None:
        if self.full_read_error is not None:
            log.info("full read of task instances works again", extra={"action": "full_read"})
        self._full_failures, self.full_read_error = 0, None
        self._metrics.full_resync_failing.set(0)

    def _full_read_failed(self, exc: AirflowError) -> None:
        """Back off the full (or targeted) read: one poll interval, doubling up to
        full_resync_seconds; the incremental reads go on every cycle meanwhile."""
        self._full_failures += 1
        backoff = self._poll.interval_seconds * 2.0 ** min(self._full_failures - 1, 20)
        delay = min(self._poll.full_resync_seconds, backoff)
        if self._poll.strategy == "targeted":
            self._next_full_attempt = self._clock() + delay
        else:
            self._next_full = self._clock() + delay
        self.full_read_error = str(exc)
        self._metrics.full_resync_failing.set(1)
        log.error(
            "%s of task instances failed (%d in a row, next in %.0f s); incremental reads go on: %s",
            "targeted read" if self._poll.strategy == "targeted" else "full read",
            self._full_failures,
            delay,
            exc,
            extra={"action": "full_read", "error": str(exc)},
        )

    async def _direct(self, job: JobRecord) -> Observation:
        key = job.key
        try:
            return observe(
                await self._airflow.get_task_instance(
                    dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
                )
            )
        except AirflowError as exc:
            return Unknown(str(exc))

    async def _confirm(self, job: JobRecord) -> Stop | None:
        """Re-read the one task instance; the stop stands only if the fresh answer says stop too."""
        key = job.key
        try:
            ti = await self._airflow.get_task_instance(
                dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
            )
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
        key = job.key
        ti = await self._airflow.get_task_instance(
            dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
        )
        verdict = judge(job, observe(ti))
        if isinstance(verdict, Keep):
            return None
        self._metrics.divergences.labels(verdict.kind).inc()
        if note:
            verdict = dataclasses.replace(verdict, reason=f"{verdict.reason}; {note[:MAX_NOTE_CHARS]}")
        await self._dispatcher.stop(job, verdict, source=source)
        return verdict

    async def sync_from_agents(self, jobs: Sequence[JobRecord]) -> None:
        """The reverse direction: record jobs that ended on their agent without anyone noticing."""
        if not jobs:
            return
        now = await self._db_time.now()
        fresh = await _bounded(
            AGENT_READ_CONCURRENCY,
            [
                refresh_from_agent(self._db, self._agents, job, now=now, start_grace=self._start_grace)
                for job in jobs
            ],
        )
        self.watch.notify(after for before, after in zip(jobs, fresh, strict=True) if after is not before)


async def _bounded(limit: int, calls: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``calls`` with at most ``limit`` in flight, by a fixed pool of workers (not one task per
    call: a burst of thousands stays a handful of tasks)."""
    results: list[T] = []
    pending = iter(enumerate(calls))
    slots: dict[int, T] = {}

    async def worker() -> None:
        for index, call in pending:
            slots[index] = await call

    await asyncio.gather(*(worker() for _ in range(min(limit, len(calls)))))
    results.extend(slots[i] for i in range(len(calls)))
    return results
