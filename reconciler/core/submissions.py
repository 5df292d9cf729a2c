"""Jobs whose ``POST /run`` was answered without the job: recorded at once, or followed to an end.

The router API records a job QUEUED, then sends it to its agent (:meth:`JobService.submit`). What the
answer means is decided in :mod:`reconciler.core.outcome` (:func:`after_run`):

- the job: RUNNING (or its end, if it could not start);
- a refusal on the merits (a 4xx: a ``cwd`` or ``run_as`` the agent cannot use): FAILED now, the
  agent's message its reason;
- the agent's own 503 (full or draining): the job is routed elsewhere (:class:`JobService`);
- anything else (a 5xx, no answer): the job stays QUEUED and :class:`Submissions` follows it. It sends
  the same ``/run`` again with backoff until the job is ``[fleet] submit_give_up_seconds`` old (an
  agent that has the job answers 409: it is read instead). Then it reads the job from its agent
  (:func:`after_unsettled_read`): one the agent runs or ran is recorded so; one it does not know (its
  own 404: :func:`~reconciler.core.agent_reports.denies`; any other 404 is no answer) is stopped there (a
  tombstone that refuses a ``/run`` arriving later) and ends FAILED with the last answer in its reason.
  A read without answer ends the job only when every ``/run`` of it was answered by the agent with an
  error (it started nothing); otherwise the job might run there, and it is asked about again until
  its agent answers, or is declared lost (which ends its jobs), or has said nothing of the job for
  ``lost_after_seconds`` past the bound (the job ends then, as a lost agent's would; should it run
  there after all, the orphan sweep stops it).

The job's payload (env, cwd...) lives only in the memory of the replica that took the submission: a
replica that dies leaves its followed jobs QUEUED. So the leader also sweeps (:meth:`sweep`) for QUEUED
jobs older than the bound plus one ``/run``'s timeout, when no ``/run`` of them can still be on its way,
and settles each the same way, without sending it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from agent_api.client import (
    AgentBusy,
    AgentClient,
    AgentError,
    AgentRejected,
    AgentUnavailable,
    JobInfo,
    JobNotFound,
)
from reconciler.core.agent_reports import denies
from reconciler.core.outcome import (
    DEFAULT_GIVE_UP_SECONDS,
    DEFAULT_RUN_TIMEOUT,
    Finish,
    GiveUp,
    MarkRunning,
    Resend,
    RunAnswer,
    RunOutcome,
    StatusOutcome,
    after_never_started_stop,
    after_run,
    after_status,
    after_unsettled_read,
    given_up,
    start_grace,
)
from reconciler.fleet.agents import AgentPool, WrongAgent
from reconciler.logfields import job_fields
from router_db import JobRecord, JobStatus, RouterDB, StaleTransition

__all__ = ["DEFAULT_GIVE_UP_SECONDS", "Submissions", "run_answer"]

log = logging.getLogger("reconciler.core.submissions")

RESEND_FIRST_SECONDS = 1.0  # the first resend comes this soon; each later one waits twice as long...
RESEND_MAX_SECONDS = 10.0  # ...up to this
ASK_AGAIN_SECONDS = 5.0  # an agent that gave no answer about a followed job is asked again this often
SWEEP_SECONDS = 5.0  # how often the leader looks for QUEUED jobs nobody follows
SWEEP_LIMIT = 500  # the oldest QUEUED jobs read per sweep
SWEEP_CONCURRENCY = 8  # agent reads of one sweep in flight at once
NEVER_STARTED = "never started: no answer to its /run"  # the tombstone's reason on the agent


def run_answer(error: BaseException) -> RunAnswer:
    """How a ``/run`` that raised ``error`` ended (see :class:`RunAnswer`)."""
    if isinstance(error, AgentBusy):
        return RunAnswer.BUSY
    if isinstance(error, AgentRejected):
        return RunAnswer.CONFLICT if error.status == 409 else RunAnswer.REFUSED
    if isinstance(error, WrongAgent | LookupError):  # raised before anything was sent
        return RunAnswer.NOT_SENT
    if isinstance(error, AgentUnavailable) and error.answered is not None:
        return RunAnswer.FAILED
    return RunAnswer.NO_ANSWER


class Submissions:
    def __init__(
        self,
        *,
        db: RouterDB,
        agents: AgentPool,
        give_up_seconds: float = DEFAULT_GIVE_UP_SECONDS,
        lost_after_seconds: float = 120.0,
        run_timeout: float = DEFAULT_RUN_TIMEOUT,
        answering: Callable[[str], bool] = lambda agent_id: True,
        notify: Callable[[Iterable[JobRecord]], object] = lambda records: None,
    ) -> None:
        """``give_up_seconds`` and ``lost_after_seconds``: the ``[fleet]`` keys of those names;
        ``run_timeout``: the longest a ``/run`` may be on its way (the agent client's timeout);
        ``answering``: whether an agent answers its health checks now; ``notify``: told of every
        record changed in the background (the long-polls' watch)."""
        self._db = db
        self._agents = agents
        self._give_up = give_up_seconds
        self._lost_after = lost_after_seconds
        self._run_timeout = run_timeout
        self._answering = answering
        self._offset = timedelta(0)  # the router DB's clock less this replica's, as last read
        self._notify = notify
        self._following: dict[str, asyncio.Task[None]] = {}

    @property
    def following(self) -> int:
        return len(self._following)

    @property
    def start_grace(self) -> float:
        """How long after its submission a job may still have a ``/run`` on the way: the bound plus one
        ``/run``'s timeout. Only past it does its agent not knowing it mean it never will."""
        return start_grace(give_up_seconds=self._give_up, run_timeout=self._run_timeout)

    def close(self) -> None:
        """The sidecar shuts down: stop following; the jobs stay QUEUED for the next leader's sweep."""
        for task in self._following.values():
            task.cancel()

    # ------------------------------------------------------------------------------ one /run's answer

    async def taken(self, job: JobRecord, info: JobInfo) -> JobRecord:
        """The agent answered with the job: record what it says (RUNNING, or its end)."""
        return await self._record(job, after_status(job.status, info.status, rc=info.rc, reason=info.reason))

    async def not_taken(self, job: JobRecord, payload: Mapping[str, Any], error: BaseException) -> JobRecord:
        """The first ``/run`` raised ``error`` (not the agent's 503, which the caller routes elsewhere):
        a refusal ends the job now; anything else is followed in the background (the job is returned
        as it is, QUEUED)."""
        answer = run_answer(error)
        await self._read_clock()
        step = after_run(answer, age=self._age(job), give_up_seconds=self._give_up, error=str(error))
        if isinstance(step, Finish):
            return await self._record(job, step)
        log.warning(
            "no clear answer to the job's /run (%s); sent again until %s s old",
            error,
            f"{self._give_up:g}",
            extra=job_fields(job, action="submit_retry"),
        )
        self._follow(job, payload, step, last=str(error), doubtful=answer.may_have_run)
        return job

    # ------------------------------------------------------------------------------ following

    def _follow(
        self, job: JobRecord, payload: Mapping[str, Any], step: RunOutcome, *, last: str, doubtful: bool
    ) -> None:
        if job.job_id in self._following:
            return
        task = asyncio.create_task(
            self._carry_on(job, dict(payload), step, last, doubtful), name=f"submit-{job.job_id}"
        )
        self._following[job.job_id] = task
        task.add_done_callback(lambda done: self._ended(job, done))

    def _ended(self, job: JobRecord, task: asyncio.Task[None]) -> None:
        self._following.pop(job.job_id, None)
        if not task.cancelled() and task.exception() is not None:  # the leader's sweep takes it over
            log.error("following the job's /run failed", exc_info=task.exception(), extra=job_fields(job))

    async def _carry_on(
        self, job: JobRecord, payload: dict[str, Any], step: RunOutcome, last: str, doubtful: bool
    ) -> None:
        sent = 1
        while True:
            if isinstance(step, Finish):
                await self._record(job, step, notify=True)
                return
            if isinstance(step, Resend):
                await asyncio.sleep(self._resend_delay(sent, job))
                if not await self._still_queued(job):
                    return
                sent += 1
                try:
                    info = await self._agents.client(job.agent_id).run(job.job_id, payload)
                except (AgentError, LookupError) as exc:
                    answer = run_answer(exc)
                    doubtful = doubtful or answer.may_have_run
                    last = str(exc)
                    step = after_run(answer, age=self._age(job), give_up_seconds=self._give_up, error=last)
                    continue
                taken = after_status(job.status, info.status, rc=info.rc, reason=info.reason)
                await self._record(job, taken, notify=True)
                log.info("job taken at send %d", sent, extra=job_fields(job, action="submit_retry"))
                return
            if not await self._still_queued(job):
                return
            why = (
                f"agent {job.agent_id} did not take the job within {self._give_up:g} s "
                f"(submit_give_up_seconds), {sent} send(s); last answer: {last}"
            )
            if await self.settle(job, why=why, doubtful=doubtful):
                return
            await asyncio.sleep(ASK_AGAIN_SECONDS)

    def _resend_delay(self, sent: int, job: JobRecord) -> float:
        """Backoff with jitter (many jobs of one agent must not resend in lockstep), but never past the
        bound: the last send comes as the job reaches it."""
        delay = min(RESEND_MAX_SECONDS, RESEND_FIRST_SECONDS * 2.0 ** (sent - 1))
        delay += random.uniform(0, RESEND_FIRST_SECONDS)  # noqa: S311 - spreads the sends, no secret
        return max(0.0, min(delay, self._give_up - self._age(job)))

    # ------------------------------------------------------------------------------ settling

    async def settle(self, job: JobRecord, *, why: str, doubtful: bool) -> bool:
        """Ask the agent about a QUEUED job past the bound and record what its answer means; True once
        the job is settled (or moved on meanwhile), False to ask again later."""
        try:
            client = self._agents.client(job.agent_id)
            info: JobInfo | None = await client.get(job.job_id)
        except JobNotFound as exc:
            if not denies(job.job_id, exc):  # a proxy's 404, a route an older agent lacks: no answer
                return await self._unanswered(job, exc, why=why, doubtful=doubtful)
            info = None
        except (AgentError, LookupError) as exc:
            return await self._unanswered(job, exc, why=why, doubtful=doubtful)
        outcome = after_unsettled_read(
            info.status if info else None,
            answered=True,
            doubtful=doubtful,
            overdue=False,
            why=why,
            rc=info.rc if info else None,
            reason=info.reason if info else None,
        )
        if isinstance(outcome, GiveUp):
            outcome = given_up(why, await self._tombstone(client, job))
        after = await self._record(job, outcome, notify=True)
        return after.status is not JobStatus.QUEUED

    async def _unanswered(self, job: JobRecord, exc: Exception, *, why: str, doubtful: bool) -> bool:
        """:meth:`settle` for a read that said nothing certain of the job."""
        overdue = self._age(job) >= self._give_up + self._lost_after
        outcome = after_unsettled_read(None, answered=False, doubtful=doubtful, overdue=overdue, why=why)
        if isinstance(outcome, Finish):
            await self._record(job, outcome, notify=True)
            return True
        log.warning(
            "agent gives no answer about a job it may run; asked again: %s",
            exc,
            extra=job_fields(job, action="submit_settle"),
        )
        return not await self._still_queued(job)

    async def _tombstone(self, client: AgentClient, job: JobRecord) -> Finish | None:
        """Stop a job its agent does not know: the stop leaves a tombstone there, so a ``/run`` that
        arrives even later is refused. None when the stop got no answer."""
        try:
            result = await client.stop(job.job_id, reason=NEVER_STARTED)
        except JobNotFound as exc:
            if denies(job.job_id, exc):  # an agent without tombstones
                return after_never_started_stop(action=None, rc=None)
            log.warning("could not leave a tombstone: %s", exc, extra=job_fields(job, action="submit_settle"))
            return None
        except AgentError as exc:
            log.warning("could not leave a tombstone: %s", exc, extra=job_fields(job, action="submit_settle"))
            return None
        return after_never_started_stop(action=result.action, rc=result.rc)

    # ------------------------------------------------------------------------------ the leader's sweep

    async def sweep(self) -> int:
        """Settle the QUEUED jobs nobody follows (their replica died or restarted): those older than
        the bound plus one ``/run``'s timeout, of agents that answer (a silent agent's jobs end by the
        lost rule). Returns how many were settled."""
        await self._read_clock()
        oldest = self.start_grace
        queued = await asyncio.to_thread(self._db.search, statuses=[JobStatus.QUEUED], limit=SWEEP_LIMIT)
        due = [
            job
            for job in queued
            if job.job_id not in self._following
            and self._age(job) >= oldest
            and self._answering(job.agent_id)
        ]
        if not due:
            return 0
        slots = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def one(job: JobRecord) -> bool:
            why = (
                f"job still QUEUED {self._age(job):.0f} s after its submission (submit_give_up_seconds "
                f"{self._give_up:g}): no answer to its /run was recorded"
            )
            async with slots:
                return await self.settle(job, why=why, doubtful=True)

        settled = await asyncio.gather(*(one(job) for job in due))
        return sum(settled)

    async def sweep_periodically(self, stopping: asyncio.Event) -> None:
        """The leader's sweep every :data:`SWEEP_SECONDS` until ``stopping`` is set."""
        while not stopping.is_set():
            try:
                await self.sweep()
            except Exception as exc:  # the router DB is down: the next sweep tries again
                log.warning("looking for unsettled submissions failed: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=SWEEP_SECONDS)

    # ------------------------------------------------------------------------------ the router DB

    def _age(self, job: JobRecord) -> float:
        """On the router DB's clock, which wrote ``created_at``: this replica's own may be minutes off.
        The offset is read again at every submission and sweep (:meth:`_read_clock`)."""
        return (datetime.now(UTC) + self._offset - job.created_at).total_seconds()

    async def _read_clock(self) -> None:
        self._offset = await asyncio.to_thread(self._db.now) - datetime.now(UTC)

    async def _still_queued(self, job: JobRecord) -> bool:
        """Whether nobody moved the job meanwhile (a stop, the catch-up, a lost agent's end)."""
        now = await asyncio.to_thread(self._db.get, job.job_id)
        return now is not None and now.status is JobStatus.QUEUED

    async def _record(self, job: JobRecord, outcome: StatusOutcome, *, notify: bool = False) -> JobRecord:
        """Record ``outcome`` for a QUEUED job; a job moved meanwhile is returned as it is now."""
        try:
            if isinstance(outcome, Finish):
                after = await asyncio.to_thread(
                    self._db.finish,
                    job.job_id,
                    status=outcome.status,
                    rc=outcome.rc,
                    reason=outcome.reason,
                    source="submit",
                )
                log.warning("job ended at submission: %s", outcome.reason, extra=job_fields(after))
            elif isinstance(outcome, MarkRunning):
                after = await asyncio.to_thread(self._db.mark_running, job.job_id, source="submit")
            else:
                return job
        except StaleTransition:
            return await asyncio.to_thread(self._db.get, job.job_id) or job
        if notify:
            self._notify([after])
        return after
