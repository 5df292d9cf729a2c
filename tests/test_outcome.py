"""What an agent's answer means for the router DB: every router status against every agent answer."""

from __future__ import annotations

import itertools

import pytest

from agent_api.protocol import AgentJobStatus, StopAction
from reconciler.core.outcome import (
    START_GRACE_SECONDS,
    Finish,
    GiveUp,
    MarkRunning,
    RetryForced,
    Unchanged,
    after_never_started_stop,
    after_status,
    after_stop,
)
from sidecar_api.protocol import JobStatus

pytestmark = pytest.mark.fast

Q, R, S, OK, F = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.STOPPING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
)
EARLY, LATE = 0.0, START_GRACE_SECONDS + 1

# (router status, agent's answer or None for "unknown job", seconds since submission) -> outcome
STATUS_TABLE: dict[tuple[JobStatus, AgentJobStatus | None, float], object] = {}
for answer, queued_for in itertools.product([None, *AgentJobStatus], [EARLY, LATE]):
    for ended_or_stopping in (S, OK, F):
        STATUS_TABLE[(ended_or_stopping, answer, queued_for)] = Unchanged()  # only the stop path changes them
    for active in (Q, R):
        if answer in (AgentJobStatus.SUCCEEDED, AgentJobStatus.FAILED):
            STATUS_TABLE[(active, answer, queued_for)] = Finish(JobStatus(answer.value), 3, "boom")
STATUS_TABLE.update(
    {
        (Q, None, EARLY): Unchanged(),  # its /run may still be on the way
        (Q, None, LATE): GiveUp(),
        (R, None, EARLY): Unchanged(),  # a running job the agent forgot: the orphan sweep's and the stop's
        (R, None, LATE): Unchanged(),
        (Q, AgentJobStatus.QUEUED, EARLY): Unchanged(),
        (Q, AgentJobStatus.QUEUED, LATE): Unchanged(),
        (Q, AgentJobStatus.RUNNING, EARLY): MarkRunning(),
        (Q, AgentJobStatus.RUNNING, LATE): MarkRunning(),
        (R, AgentJobStatus.QUEUED, EARLY): Unchanged(),
        (R, AgentJobStatus.QUEUED, LATE): Unchanged(),
        (R, AgentJobStatus.RUNNING, EARLY): Unchanged(),
        (R, AgentJobStatus.RUNNING, LATE): Unchanged(),
    }
)


def test_the_table_covers_every_combination() -> None:
    combos = set(itertools.product(JobStatus, [None, *AgentJobStatus], [EARLY, LATE]))
    assert set(STATUS_TABLE) == combos


@pytest.mark.parametrize(("case", "expected"), STATUS_TABLE.items(), ids=[str(k) for k in STATUS_TABLE])
def test_a_status_answer_is_recorded_by_the_table(
    case: tuple[JobStatus, AgentJobStatus | None, float], expected: object
) -> None:
    status, answer, queued_for = case
    assert after_status(status, answer, rc=3, reason="boom", queued_for=queued_for) == expected


def test_an_exit_without_a_reason_says_its_rc() -> None:
    assert after_status(R, AgentJobStatus.FAILED, rc=2) == Finish(F, 2, "exited with rc 2")
    assert after_status(R, AgentJobStatus.SUCCEEDED, rc=0) == Finish(OK, 0, "exited with rc 0")


def test_the_grace_ends_exactly_at_its_limit() -> None:
    assert after_status(Q, None, queued_for=START_GRACE_SECONDS - 0.001) == Unchanged()
    assert after_status(Q, None, queued_for=START_GRACE_SECONDS) == GiveUp()


@pytest.mark.parametrize("intent", [None, OK, F])
@pytest.mark.parametrize("action", [*StopAction, None])
@pytest.mark.parametrize("ok", [True, False, None])
def test_a_stop_answer_keeps_the_intent_and_the_process_rc(
    intent: JobStatus | None, action: StopAction | None, ok: bool | None
) -> None:
    outcome = after_stop(intent=intent, reason="task failed", ok=ok, action=action, rc=-15)
    if ok is None or action is None:  # the agent does not know the job: it cannot be running there
        assert outcome == Finish(F, None, "task failed; agent has no record of the job", "unknown_job")
    elif not ok:  # processes survived SIGKILL: never recorded as stopped
        assert outcome == RetryForced()
    elif action is StopAction.ALREADY_FINISHED:
        assert outcome == Finish(
            intent or F, -15, "task failed; job had already ended on the agent", "already_finished"
        )
    else:
        assert outcome == Finish(intent or F, -15, "task failed", "stopped")


@pytest.mark.parametrize("action", [*StopAction, None])
def test_a_given_up_job_ends_failed_and_says_whether_it_ran(action: StopAction | None) -> None:
    outcome = after_never_started_stop(action=action, rc=-9)
    if action in (StopAction.TERMINATED, StopAction.KILLED):
        assert outcome == Finish(F, -9, "started too late; stopped")
    else:
        assert outcome == Finish(F, None, "agent never started the job")
