"""What an agent's answer means for the router DB: pure rules, beside :mod:`reconciler.core.decision`.

:mod:`reconciler.core.decision` decides from Airflow's answer whether a job must stop; this module decides
from the agent's answer what the router DB records. Three questions are asked of an agent:

- :func:`after_status` — "how is this job?" (``GET /jobs/{id}``), for a QUEUED or RUNNING job;
- :func:`after_stop` — "stop it" (``POST /stop/{id}``), for a STOPPING job, and
  :func:`after_never_started_stop` for a QUEUED job given up on;
- :func:`after_run` — "run it" (``POST /run``) answered without the job, and
  :func:`after_unsettled_read` once such a job is past ``[fleet] submit_give_up_seconds``.

Each returns what to do; the callers (:mod:`reconciler.core.job_service`, :mod:`reconciler.core.stops`,
:mod:`reconciler.core.submissions`) carry it out. No I/O here, so every combination is tested
(``tests/test_outcome.py``, ``tests/test_submit_give_up.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent_api.protocol import AgentJobStatus, StopAction
from sidecar_api.protocol import JobStatus

DEFAULT_GIVE_UP_SECONDS = 60.0  # [fleet] submit_give_up_seconds, when not configured
DEFAULT_RUN_TIMEOUT = 10.0  # how long the sidecar's ``/run`` may be on its way (its agent requests' timeout)


def start_grace(*, give_up_seconds: float, run_timeout: float) -> float:
    """How long after its submission a QUEUED job its agent does not know may still have a ``/run`` on
    the way: sent again until ``[fleet] submit_give_up_seconds``, the last send taking up to
    ``run_timeout``. Before then the agent not knowing the job proves nothing; after, it is given up.
    The one bound for the catch-up, the rolling sweep and the leader's sweep of submissions."""
    return give_up_seconds + run_timeout


# With the defaults: for a caller not given the configured ``[fleet] submit_give_up_seconds``.
START_GRACE_SECONDS = start_grace(give_up_seconds=DEFAULT_GIVE_UP_SECONDS, run_timeout=DEFAULT_RUN_TIMEOUT)


@dataclass(frozen=True)
class Unchanged:
    """Record nothing."""


@dataclass(frozen=True)
class MarkRunning:
    """QUEUED -> RUNNING: the agent runs it."""


@dataclass(frozen=True)
class Finish:
    """End the job with this status, rc and reason."""

    status: JobStatus
    rc: int | None
    reason: str | None
    kind: str = "exited"  # of a stop: stopped, already_finished or unknown_job (the metric's outcome)


@dataclass(frozen=True)
class GiveUp:
    """A QUEUED job its agent never started: stop it there (leaving a tombstone that refuses a late
    ``/run``), then record :func:`after_never_started_stop`."""


@dataclass(frozen=True)
class RetryForced:
    """Processes survived the stop: the job stays STOPPING; the next attempt uses SIGKILL at once."""

    kind: str = "survived"


StatusOutcome = Unchanged | MarkRunning | Finish | GiveUp
StopOutcome = Finish | RetryForced


def after_status(
    status: JobStatus,
    answer: AgentJobStatus | None,
    *,
    rc: int | None = None,
    reason: str | None = None,
    queued_for: float = 0.0,
    start_grace: float = START_GRACE_SECONDS,
) -> StatusOutcome:
    """The router DB's ``status`` and the agent's answer (``None``: the agent does not know the job);
    ``queued_for`` is how long the job has been recorded (seconds), ``start_grace`` how long its
    ``/run`` may still be on the way (:func:`start_grace`)."""
    if status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return Unchanged()  # a stop under way or an ended job: only the stop path changes it
    if answer is None:
        if status is JobStatus.QUEUED and queued_for >= start_grace:
            return GiveUp()
        return Unchanged()  # a RUNNING job the agent forgot is the orphan sweep's and the stop's business
    if answer in (AgentJobStatus.SUCCEEDED, AgentJobStatus.FAILED):
        return Finish(JobStatus(answer.value), rc, reason or f"exited with rc {rc}")
    if answer is AgentJobStatus.RUNNING and status is JobStatus.QUEUED:
        return MarkRunning()
    return Unchanged()


def after_stop(
    *,
    intent: JobStatus | None,
    reason: str | None,
    ok: bool | None,
    action: StopAction | None,
    rc: int | None,
) -> StopOutcome:
    """A STOPPING job's stop answered: ``ok``/``action``/``rc`` from the agent, or all None when the
    agent does not know the job. ``intent`` is the status chosen when the stop was decided."""
    if ok is None or action is None:
        return Finish(JobStatus.FAILED, None, f"{reason}; agent has no record of the job", "unknown_job")
    if not ok:
        return RetryForced()
    # The status chosen at intent stands whatever the process did meanwhile (a retried stop whose
    # first answer was lost finds the job ended by that first stop); rc keeps the process truth.
    status = intent or JobStatus.FAILED
    if action is StopAction.ALREADY_FINISHED:
        return Finish(status, rc, f"{reason}; job had already ended on the agent", "already_finished")
    return Finish(status, rc, reason, "stopped")


def after_never_started_stop(*, action: StopAction | None, rc: int | None) -> Finish:
    """A given-up QUEUED job's stop answered (``action`` None: the agent keeps no tombstones)."""
    if action is None or action is StopAction.ALREADY_FINISHED:
        return Finish(JobStatus.FAILED, None, "agent never started the job")
    return Finish(JobStatus.FAILED, rc, "started too late; stopped")  # it started after all, late


class RunAnswer(StrEnum):
    """How a ``POST /run`` ended when it did not answer with the job."""

    REFUSED = "refused"  # a 4xx on the merits (bad cwd, unknown run_as...): sending it again won't help
    CONFLICT = "conflict"  # 409: the agent has a job of this id (an earlier send's, or a stop's tombstone)
    BUSY = "busy"  # the agent's own 503: full or draining, it took nothing
    FAILED = "failed"  # another 5xx the agent answered itself: it received the job and started nothing
    NO_ANSWER = "no_answer"  # refused or reset connection, timeout, a proxy's 5xx: it may have started
    NOT_SENT = "not_sent"  # the sidecar sent nothing (another agent answers at the URL, or none is known)

    @property
    def may_have_run(self) -> bool:
        return self is RunAnswer.NO_ANSWER


@dataclass(frozen=True)
class Resend:
    """Send the same ``/run`` again, later: the agent refuses a second copy of a job it has (409)."""


@dataclass(frozen=True)
class AskAgent:
    """Read the job from its agent, then judge the answer with :func:`after_unsettled_read`."""


RunOutcome = Finish | Resend | AskAgent


def after_run(answer: RunAnswer, *, age: float, give_up_seconds: float, error: str) -> RunOutcome:
    """A QUEUED job's ``/run`` did not answer with the job: ``answer`` says how it ended, ``error``
    in the client's words; ``age``: seconds since the job was recorded."""
    if answer is RunAnswer.REFUSED:
        return Finish(JobStatus.FAILED, None, f"agent refused the job: {error}")
    if answer is RunAnswer.CONFLICT:
        return AskAgent()
    return Resend() if age < give_up_seconds else AskAgent()


def after_unsettled_read(
    answer: AgentJobStatus | None,
    *,
    answered: bool,
    doubtful: bool,
    overdue: bool,
    why: str,
    rc: int | None = None,
    reason: str | None = None,
) -> StatusOutcome:
    """A QUEUED job past ``submit_give_up_seconds``, read from its agent: ``answer`` its status there
    (None: the agent does not know it), or ``answered`` False when the read got no usable answer.
    ``doubtful``: a ``/run`` of it may have reached the agent unanswered (:attr:`RunAnswer.may_have_run`);
    ``overdue``: the agent has said nothing usable of it for ``lost_after_seconds`` past the bound;
    ``why`` starts the reason it ends with.

    A job the agent has is judged as any status read (RUNNING, or its end; QUEUED there: ask again).
    One it does not know is given up (its stop leaves a tombstone that refuses a late ``/run``). With
    no answer, a job no ``/run`` may have started ends now; any other might run there and is asked
    about again, until its agent is lost (which ends it) or, answering its health checks but not for
    this job, stays so ``lost_after_seconds`` more: the job ends as a lost agent's would, and should it
    run there after all, the orphan sweep stops it."""
    if not answered:
        if not doubtful:
            return Finish(
                JobStatus.FAILED, None, f"{why}; every /run was answered with an error: never started"
            )
        if not overdue:
            return Unchanged()
        return Finish(
            JobStatus.FAILED, None, f"{why}; its agent said nothing of it for lost_after_seconds more"
        )
    if answer is None:
        return GiveUp()
    return after_status(JobStatus.QUEUED, answer, rc=rc, reason=reason)


def given_up(why: str, stop: Finish | None) -> Finish:
    """How a job :func:`after_unsettled_read` gave up on ends: the stop's outcome
    (:func:`after_never_started_stop`) after ``why``, or, when the stop got no answer, FAILED all the
    same: its agent said it has no such job, and no ``/run`` of it is on its way any more."""
    if stop is None:
        return Finish(JobStatus.FAILED, None, f"{why}; agent has no record of the job")
    return Finish(stop.status, stop.rc, f"{why}; {stop.reason}", stop.kind)
