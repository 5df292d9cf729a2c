"""The decision table: what to do with an active job, given what Airflow says of its task instance.

Pure: plain values in, plain values out. The loop fetches observations, calls :func:`decide`, and hands
the result to the stop dispatcher; a stop is acted on only if a direct re-read decides the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from router_db import JobStatus

# Task-instance states in which the job's work is still wanted (on the job's own try).
KEEP_STATES = frozenset({"running", "deferred", "queued", "scheduled", "up_for_reschedule"})
# A person or Airflow ended the task: the job fails, the reason names the state.
FAILED_STATES = frozenset({"failed", "upstream_failed", "skipped", "removed"})
# The try is over and another may follow: cleared (no state), restarting, or waiting to retry.
CLEARED_STATES = frozenset({None, "restarting", "up_for_retry"})


MAX_NOTE_CHARS = 500  # of a caller's words kept in a stop's reason (the push endpoint's ``reason``)


class Divergence(StrEnum):
    """Why a job must stop; also the ``kind`` label of ``reconciler_divergences_total``."""

    TI_FAILED = "ti_failed"
    TI_SUCCESS = "ti_success"
    TI_CLEARED = "ti_cleared"
    NEWER_TRY = "newer_try"
    TI_ABSENT = "ti_absent"
    TI_REPLACED = "ti_replaced"
    FORCED = "forced"  # not Airflow's word: a person stopped it by hand (agentic jobs stop --force)


@dataclass(frozen=True, slots=True)
class Observed:
    """Airflow answered with this task instance."""

    state: str | None
    try_number: int
    identity: str | None = None  # see reconciler.airflow.client.TaskInstance.identity


@dataclass(frozen=True, slots=True)
class Absent:
    """Airflow answered, and the task instance (or its DAG run) does not exist."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """Airflow did not give a usable answer (unreachable, 5xx, auth failure, garbage)."""

    why: str


Observation = Observed | Absent | Unknown


@dataclass(frozen=True, slots=True)
class Keep:
    why: str


@dataclass(frozen=True, slots=True)
class Stop:
    kind: Divergence
    final_status: JobStatus  # what the router DB records once the agent confirms the stop
    reason: str


Decision = Keep | Stop


def decide(job_try: int, observation: Observation, *, job_identity: str = "") -> Decision:
    """Map one observation of a job's task instance to keep or stop.

    ``job_identity`` is the identity of the task instance the job was submitted for ("" if unknown):
    a task instance of the same key but another identity belongs to a DAG run created again after
    the job's was deleted. Anything not positively known to diverge is kept: a false stop kills real
    work and is worse than a late one.
    """
    if (
        isinstance(observation, Observed)
        and job_identity
        and observation.identity
        and _kind(observation.identity) == _kind(job_identity)  # an Airflow upgrade changes the kind
        and observation.identity != job_identity
    ):
        # Another task instance under the job's key. Airflow 3 also gives a task instance a new id
        # when its try ends (cleared, retried): then the state says so, in more precise words.
        decision = decide(job_try, replace(observation, identity=None))
        if isinstance(decision, Stop):
            return decision
        return Stop(
            Divergence.TI_REPLACED,
            JobStatus.FAILED,
            "task instance was replaced (its DAG run was deleted and created again); "
            "this job belongs to the old one",
        )
    match observation:
        case Unknown(why=why):
            return Keep(f"airflow answer unusable: {why}")
        case Absent():
            return Stop(Divergence.TI_ABSENT, JobStatus.FAILED, "task instance no longer exists in Airflow")
        case Observed(state=state, try_number=ti_try):
            if ti_try > job_try:
                return Stop(
                    Divergence.NEWER_TRY,
                    JobStatus.FAILED,
                    f"task instance is on try {ti_try}; this job belongs to try {job_try}",
                )
            if ti_try < job_try:
                return Keep(f"airflow reports older try {ti_try} than the job's {job_try}")
            if state in KEEP_STATES:
                return Keep(f"task instance is {state}")
            if state in FAILED_STATES:
                return Stop(Divergence.TI_FAILED, JobStatus.FAILED, f"task instance is {state}")
            if state == "success":
                # Marked success by a person: the router DB follows Airflow's verdict; rc keeps
                # the process truth (negative: ended by a signal).
                return Stop(Divergence.TI_SUCCESS, JobStatus.SUCCEEDED, "task instance marked success")
            if state in CLEARED_STATES:
                shown = state or "no state (cleared)"
                return Stop(
                    Divergence.TI_CLEARED, JobStatus.FAILED, f"task instance is {shown}; this try is over"
                )
            return Keep(f"unrecognised task-instance state {state!r}")
    raise AssertionError(f"not an observation: {observation!r}")  # pragma: no cover


def _kind(identity: str) -> str:
    """``logical_date`` (Airflow 2) or ``id`` (Airflow 3): identities of two kinds say nothing."""
    return identity.partition(":")[0] if identity.startswith("logical_date:") else "id"
