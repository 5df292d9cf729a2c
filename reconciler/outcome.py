"""What an agent's answer means for the router DB: pure rules, beside :mod:`reconciler.decision`.

:mod:`reconciler.decision` decides from Airflow's answer whether a job must stop; this module decides
from the agent's answer what the router DB records. Two questions are asked of an agent:

- :func:`after_status` — "how is this job?" (``GET /jobs/{id}``), for a QUEUED or RUNNING job;
- :func:`after_stop` — "stop it" (``POST /stop/{id}``), for a STOPPING job, and
  :func:`after_never_started_stop` for a QUEUED job given up on.

Each returns what to do; the callers (:mod:`reconciler.job_service`, :mod:`reconciler.stops`) carry it
out. No I/O here, so every combination is tested (``tests/test_outcome.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_api.protocol import AgentJobStatus, StopAction
from sidecar_api.protocol import JobStatus

# A QUEUED job its agent does not know may still have its ``/run`` on the way (the sidecar's own
# request times out after 10 s): it is given up only this long after submission.
START_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class Keep:
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


StatusOutcome = Keep | MarkRunning | Finish | GiveUp
StopOutcome = Finish | RetryForced


def after_status(
    status: JobStatus,
    answer: AgentJobStatus | None,
    *,
    rc: int | None = None,
    reason: str | None = None,
    queued_for: float = 0.0,
) -> StatusOutcome:
    """The router DB's ``status`` and the agent's answer (``None``: the agent does not know the job);
    ``queued_for`` is how long the job has been recorded (seconds)."""
    if status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return Keep()  # a stop under way or an ended job: only the stop path changes it
    if answer is None:
        if status is JobStatus.QUEUED and queued_for >= START_GRACE_SECONDS:
            return GiveUp()
        return Keep()  # a RUNNING job the agent forgot is the orphan sweep's and the stop's business
    if answer in (AgentJobStatus.SUCCEEDED, AgentJobStatus.FAILED):
        return Finish(JobStatus(answer.value), rc, reason or f"exited with rc {rc}")
    if answer is AgentJobStatus.RUNNING and status is JobStatus.QUEUED:
        return MarkRunning()
    return Keep()


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
