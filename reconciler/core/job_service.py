"""What the router API does, apart from HTTP: submit a job, take a pushed state change, read a job
(at once, or once it changes: a long-poll), its events and its log, and record what agents report.
The HTTP layer (:mod:`reconciler.api.server`) parses and answers.

A job is read from the router DB, never from its agent: the loop's once-a-cycle catch-up and the
agents' heartbeats record exits (:meth:`JobService.apply_agent_reports`), and a long-poll waiter
hears of them at once (:mod:`reconciler.core.watch`).

What an agent's answer means for the router DB is decided in :mod:`reconciler.core.outcome`; this module
and :mod:`reconciler.core.agent_reports` ask and record. A job whose ``/run`` got neither the job nor a
refusal is followed by :mod:`reconciler.core.submissions` until it runs or ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent_api.client import AgentBusy, AgentError, JobInfo, JobNotFound, LogChunk
from reconciler import errors
from reconciler.airflow.task_instances import AirflowError
from reconciler.core.agent_reports import apply_agent_reports
from reconciler.core.agent_sync import AgentSync
from reconciler.core.confirmer import Confirmer
from reconciler.core.db_time import DbTime
from reconciler.core.decision import MAX_NOTE_CHARS, Divergence, Stop
from reconciler.core.stops import StopDispatcher
from reconciler.core.submissions import Submissions
from reconciler.core.watch import JobWatch
from reconciler.fleet.agent_state import AgentState
from reconciler.fleet.agents import AgentPool, NoAgent, NoCapacity, unconfigured_reason
from reconciler.fleet.liveness import Fleet
from reconciler.logfields import job_fields
from reconciler.metrics import Metrics
from router_db import EventRecord, JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey
from sidecar_api.protocol import SubmitRequest, UpdateRequest, job_not_found

log = logging.getLogger(__name__)

UPDATE_WAIT_SECONDS = 15.0  # update_status answers with the stop's outcome if the agent is this quick
LOST_AGENT_RETRY_AFTER = 15  # seconds: a submission to a lost agent is answered 503 with this
NO_CAPACITY_RETRY_AFTER = 5  # seconds: about how soon the operator's trigger records a job's end


class _NotTaken(Exception):
    """The agent refused the job for want of room and started nothing; the job was forgotten."""


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool  # False: the same try was submitted before; this is its job


@dataclass(frozen=True)
class Update:
    """What ``update_status`` did: ``action`` (none, already_final, stop_pending, kept, stopped,
    stop_requested), the job before and after, and the HTTP status that says so."""

    code: int
    ok: bool
    message: str
    action: str
    job: JobRecord | None
    previous: JobStatus | None = None


class JobService:
    def __init__(
        self,
        *,
        db: RouterDB,
        agents: AgentPool,
        fleet: Fleet | None,
        confirmer: Confirmer,
        sync: AgentSync,
        watch: JobWatch,
        dispatcher: StopDispatcher,
        when_full: str = "wait",
        metrics: Metrics | None = None,
        submissions: Submissions | None = None,
    ) -> None:
        self._db = db
        self._db_time = DbTime(db.now)  # a queued job's age is measured on the clock that wrote it
        self._watch = watch  # one per process: the loop's changes wake our waiters
        # Follows the jobs whose /run got no clear answer (the leader's sweep uses the same object).
        self._submissions = submissions or Submissions(db=db, agents=agents, notify=self._watch.notify)
        self._agents = agents
        self._fleet = fleet
        self._confirmer = confirmer
        self._sync = sync
        self._dispatcher = dispatcher
        self._when_full = when_full  # [fleet] when_full: "wait" or "refuse"
        self._metrics = metrics
        self._background: set[asyncio.Task[None]] = set()
        # Counting agents' loads and recording the job chosen by them happen one submission at a
        # time: two submissions must not both take an agent's last slot.
        self._placing = asyncio.Lock()

    async def submit(self, request: SubmitRequest) -> Submitted:
        """Record the try's job and start it on an agent; a resubmission of the same try returns its
        job unchanged (idempotent). Raises Invalid when no agent matches; Unavailable when the agent
        named is lost or another agent answers at its URL; when no agent the route allows has room
        (lost, draining or full), NoRoomForNow (the operator retries) or NoRoomAtAll (the task fails)
        as [fleet] when_full says."""
        key = TaskInstanceKey(
            dag_id=request.dag_id,
            task_id=request.task_id,
            run_id=request.run_id,
            map_index=request.map_index,
            try_number=request.try_number,
        )
        refused: dict[str, str] = {}  # agents that refused this job at POST /run, in their words
        superseding = True
        # An agent that refuses the job (full or draining: the sidecar's view of it was behind)
        # started nothing. Its job is forgotten rather than ended FAILED: a FAILED job is what the
        # task's next submission of this try would find (one job per try), so the task would fail
        # instead of waiting for room. The job is routed again without that agent, until one takes
        # it or none is left (each agent is tried at most once): then the answer is the no-capacity
        # one, naming the refusals, and the operator's retry routes afresh.
        while True:
            try:
                job, created = await self._place(request, key, refused)
            except errors.Refused as exc:
                existing = await asyncio.to_thread(self._db.find, key, request.ti_identity)
                if existing is not None:
                    return Submitted(existing, False)  # this try was submitted before: its job
                if isinstance(exc, errors.NoRoom) and self._metrics is not None:
                    self._metrics.no_capacity.inc()
                raise
            if not created:
                return Submitted(job, False)
            if superseding:
                superseding = False
                self._later(self._stop_superseded(job))
            try:
                return Submitted(await self._start_on_agent(job, request.payload), True)
            except _NotTaken as exc:
                refused[job.agent_id] = str(exc)

    async def _place(
        self, request: SubmitRequest, key: TaskInstanceKey, refused: Mapping[str, str]
    ) -> tuple[JobRecord, bool]:
        """Choose the agent and record the job there (or find this try's job, ``created`` False)."""
        try:
            eligible = self._agents.eligible(agent_id=request.agent_id, labels=request.labels)
        except NoAgent as exc:
            raise errors.Invalid(str(exc)) from None
        # Only agents whose fence, if they would fence the job, ends it before they are declared lost;
        # none, and the task fails now, saying why, rather than wait for an agent that cannot come.
        asked = bool(request.payload.get("at_most_once"))
        unfenced = {a: why for a in eligible if (why := self._fence_refusal(a, asked))}
        if unfenced and len(unfenced) == len(eligible):
            raise errors.Invalid(
                "no agent the route allows can run this job within its fence: "
                + "; ".join(unfenced.values()),
            )
        refused = {**unfenced, **refused}
        if not self._agents.limited(eligible):  # no agent has a limit: loads do not matter
            return await self._record(request, key, refused, load=None)
        async with self._placing:
            load = await asyncio.to_thread(self._db.active_counts)
            return await self._record(request, key, refused, load=load)

    async def _record(
        self,
        request: SubmitRequest,
        key: TaskInstanceKey,
        refused: Mapping[str, str],
        *,
        load: Mapping[str, int] | None,
    ) -> tuple[JobRecord, bool]:
        try:
            agent_id = self._agents.route(
                agent_id=request.agent_id, labels=request.labels, load=load, refused=refused
            )
        except NoCapacity as exc:
            raise self._no_capacity(str(exc)) from None
        refusal = self._agents.refuse(agent_id)
        if refusal is not None or (
            self._fleet is not None and self._fleet.state(agent_id) is AgentState.LOST
        ):
            # Only an agent named by agent_id gets here so (routing by labels skips both): the
            # operator retries, and the job starts once the agent answers again.
            raise errors.Unavailable(
                refusal or f"agent {agent_id} is lost: it does not answer its health checks",
                retry_after=LOST_AGENT_RETRY_AFTER,
            )
        # Whether its agent fences it, and how long that takes, as the agent's terms say now: kept with
        # the job, so a sidecar restarted or taking over before it hears the agent waits as long.
        terms = None if self._fleet is None else self._fleet.fence_terms(agent_id)
        asked = bool(request.payload.get("at_most_once"))
        fenced = asked or (terms is not None and terms.fenced(asked))
        bound = terms.gone_after() if terms is not None and terms.fenced(asked) else None
        new = NewJob(key, agent_id, request.command, request.ti_identity, fenced, bound)
        return await asyncio.to_thread(self._db.submit, new)

    def _fence_refusal(self, agent_id: str, at_most_once: bool) -> str | None:
        """Why a job must not go to the agent for its fence (:meth:`Fleet.fence_refusal`)."""
        return None if self._fleet is None else self._fleet.fence_refusal(agent_id, at_most_once=at_most_once)

    def _no_capacity(self, message: str) -> errors.NoRoom:
        if self._when_full == "refuse":
            return errors.NoRoomAtAll(message)
        return errors.NoRoomForNow(message, retry_after=NO_CAPACITY_RETRY_AFTER)

    async def _stop_superseded(self, new: JobRecord) -> None:
        """A new try of a task instance (or the first try of a re-created run's) means the jobs of the
        older ones must stop: no need to wait for a poll to notice. Each is confirmed by a direct read
        of the task instance, as every stop is, so a late or replayed submission stops nothing."""
        key = new.key
        older = await asyncio.to_thread(
            self._db.active_tries,
            dag_id=key.dag_id,
            task_id=key.task_id,
            run_id=key.run_id,
            map_index=key.map_index,
        )
        for job in older:
            if job.job_id == new.job_id or job.status is JobStatus.STOPPING:
                continue
            if job.key.try_number < key.try_number or job.ti_identity != new.ti_identity:
                try:
                    await self._confirmer.check(job, source="submit")
                except AirflowError as exc:  # the poll loop will see it: only the shortcut is lost
                    log.warning("cannot confirm an older try now: %s", exc, extra=job_fields(job))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beside the request, which answers without waiting for it."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start_on_agent(self, job: JobRecord, payload: dict[str, Any]) -> JobRecord:
        try:
            info = await self._agents.client(job.agent_id).run(job.job_id, payload)
        except AgentBusy as exc:  # full or draining, by the agent's own count: it started nothing
            return await self._not_taken(job, exc.message)
        except AgentError as exc:
            # A refusal on the merits (4xx) ends the job now, with the agent's words; a 5xx or no
            # answer leaves it QUEUED, sent again and settled within [fleet] submit_give_up_seconds.
            return await self._submissions.not_taken(job, payload, exc)
        return await self._submissions.taken(job, info)

    async def _not_taken(self, job: JobRecord, why: str) -> JobRecord:
        """Forget a job its agent refused for want of room (raises :class:`_NotTaken`); a job that
        moved meanwhile (the loop or another request got to it) is answered as it is now."""
        fields = job_fields(job, action="agent_refused_job")
        if not await asyncio.to_thread(self._db.forget_unstarted, job.job_id, agent_id=job.agent_id):
            return await asyncio.to_thread(self._db.get, job.job_id) or job
        log.warning("agent refused the job at submit, started nothing; job forgotten: %s", why, extra=fields)
        raise _NotTaken(why)

    async def update_status(self, request: UpdateRequest) -> Update:
        """The push path: someone reports a task's new state. The job is checked exactly as the poll
        loop would: Airflow is read directly, and the job stops only if Airflow confirms it."""
        if request.job_id is not None:
            job = await asyncio.to_thread(self._db.get, request.job_id)
        else:
            job = await asyncio.to_thread(
                self._db.find_latest,
                dag_id=request.dag_id,
                task_id=request.task_id,
                run_id=request.run_id,
                map_index=request.map_index,
            )
        if job is None:
            return Update(404, False, "Job not found with provided identifiers", "none", None)
        if not job.active:
            return Update(200, True, f"job already ended {job.status}", "already_final", job)
        if job.status is JobStatus.STOPPING:
            return Update(200, True, "stop already under way", "stop_pending", job)
        if request.force:
            why = (request.reason or "no reason given")[:MAX_NOTE_CHARS]
            forced = Stop(
                Divergence.FORCED, JobStatus.FAILED, f"stopped by hand, without Airflow's confirmation: {why}"
            )
            await self._dispatcher.stop(job, forced, source="api")
            return await self._stopped(job, forced)
        try:
            stop = await self._confirmer.check(job, source="api", note=request.reason)
        except AirflowError as exc:
            return Update(503, False, f"cannot confirm with Airflow ({exc}); nothing stopped", "none", job)
        if stop is None:
            message = "Airflow still wants this task instance to run; job not stopped"
            return Update(409, False, message, "kept", job)
        return await self._stopped(job, stop)

    async def _stopped(self, job: JobRecord, stop: Stop) -> Update:
        """The answer once a stop is under way: its outcome if the agent confirms within a while."""
        await self._dispatcher.wait(job.job_id, UPDATE_WAIT_SECONDS)
        after = await asyncio.to_thread(self._db.get, job.job_id) or job
        if after.status is JobStatus.STOPPING:
            message = f"{stop.reason}; Agent communication failed or is slow, the stop is retried every cycle"
            return Update(202, True, message, "stop_requested", after, previous=job.status)
        return Update(200, True, stop.reason, "stopped", after, previous=job.status)

    async def job(self, job_id: str, *, wait: float = 0.0, known: JobStatus | None = None) -> JobRecord:
        """The job as the router DB records it (its agent is not asked: see the module's docstring).

        With ``wait`` (seconds), a long-poll: the answer comes once the job's status differs from
        ``known`` (default: its status now), or the job has ended, or ``wait`` has passed (then the job
        unchanged)."""
        job = await self.recorded(job_id)
        if wait <= 0:
            return job
        expected = known or job.status
        return await self._watch.wait(job, lambda now: now.status is not expected or not now.active, wait)

    async def apply_agent_reports(self, agent_id: str, jobs: Sequence[JobInfo], *, full: bool = False) -> int:
        """Record what ``agent_id`` reports of ``jobs`` (``full``: every job it knows), as the loop's
        catch-up does; returns how many jobs changed. See :mod:`reconciler.core.agent_reports`."""
        recorded = await apply_agent_reports(
            self._db,
            self._agents,
            self._watch,
            agent_id,
            jobs,
            full=full,
            now=await self._db_time.now(),
            start_grace=self._submissions.start_grace,  # the bound its submissions keep
        )
        return recorded.changed

    def close(self) -> None:
        """The server shuts down: every long-poll answers now with the job as it is; jobs followed
        after an unclear /run stay QUEUED, for the next leader's sweep."""
        self._watch.close()
        self._submissions.close()

    async def recorded(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(self._db.get, job_id)
        if job is None:
            raise errors.NoSuchJob(job_not_found(job_id))
        return job

    async def search(
        self,
        *,
        dag_id: str | None,
        run_id: str | None,
        statuses: Sequence[JobStatus] | None,
        limit: int,
        agent_id: str | None = None,
        since: datetime | None = None,
        newest_first: bool = False,
    ) -> list[JobRecord]:
        return await asyncio.to_thread(
            self._db.search,
            dag_id=dag_id,
            run_id=run_id,
            statuses=statuses,
            agent_id=agent_id,
            since=since,
            limit=limit,
            newest_first=newest_first,
        )

    async def events(self, job_id: str) -> tuple[JobRecord, list[EventRecord]]:
        job = await self.recorded(job_id)
        return job, await asyncio.to_thread(self._db.events, job.job_id)

    async def log(self, job: JobRecord, *, offset: int, limit: int | None, cursor: bool = False) -> LogChunk:
        """The job's output from its agent (``cursor``: read as the task's log, see the agent's API);
        AgentUnreachable when the agent does not answer (or registered but this replica has not read
        it yet), NotFound when it keeps no log of the job, Gone when the agent is no longer configured
        (nor registered): nothing can read that log any more."""
        if not self._sync.answering(job.agent_id):
            state = "unknown" if self._fleet is None else str(self._fleet.state(job.agent_id))
            why = f"agent {job.agent_id} is {state}: it does not answer its health checks"
            raise errors.AgentUnreachable(self._agents.refuse(job.agent_id) or why)
        try:
            client = self._agents.client(job.agent_id)
        except NoAgent:
            if job.agent_id in await self._sync.known_agents():
                message = f"agent {job.agent_id} registered, but this replica has not read it yet; try again"
                raise errors.AgentUnreachable(message) from None
            message = f"{unconfigured_reason(job.agent_id)}: the log of job {job.job_id} cannot be read"
            raise errors.Gone(message) from None
        except AgentError as exc:  # another agent answers at its URL
            raise errors.AgentUnreachable(f"agent {job.agent_id} communication failed: {exc}") from None
        try:
            return await client.log(job.job_id, offset=offset, limit=limit, cursor=cursor)
        except JobNotFound:
            raise errors.NotFound(f"agent {job.agent_id} has no log for job {job.job_id}") from None
        except AgentError as exc:
            raise errors.AgentUnreachable(f"agent {job.agent_id} communication failed: {exc}") from None
