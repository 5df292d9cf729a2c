"""Every row of the design's decision table, without a network."""

from __future__ import annotations

import pytest

from reconciler.decision import Absent, Divergence, Keep, Observed, Stop, Unknown, decide
from router_db import JobStatus

JOB_TRY = 2


@pytest.mark.parametrize("state", ["running", "deferred", "queued", "scheduled", "up_for_reschedule"])
def test_task_still_wanted_on_the_same_try_keeps_the_job(state: str) -> None:
    assert isinstance(decide(JOB_TRY, Observed(state, JOB_TRY)), Keep)


@pytest.mark.parametrize("state", ["failed", "upstream_failed", "skipped", "removed"])
def test_ended_task_stops_the_job_as_failed_naming_the_state(state: str) -> None:
    verdict = decide(JOB_TRY, Observed(state, JOB_TRY))
    assert verdict == Stop(Divergence.TI_FAILED, JobStatus.FAILED, f"task instance is {state}")


def test_task_marked_success_stops_the_job_and_records_success() -> None:
    verdict = decide(JOB_TRY, Observed("success", JOB_TRY))
    assert isinstance(verdict, Stop)
    assert (verdict.kind, verdict.final_status) == (Divergence.TI_SUCCESS, JobStatus.SUCCEEDED)


@pytest.mark.parametrize("state", ["restarting", "up_for_retry", None])
def test_cleared_or_retrying_task_ends_this_try(state: str | None) -> None:
    verdict = decide(JOB_TRY, Observed(state, JOB_TRY))
    assert isinstance(verdict, Stop)
    assert (verdict.kind, verdict.final_status) == (Divergence.TI_CLEARED, JobStatus.FAILED)


@pytest.mark.parametrize("state", ["running", "deferred", "queued", None, "success"])
def test_newer_try_stops_the_job_of_the_older_try_whatever_the_state(state: str | None) -> None:
    verdict = decide(JOB_TRY, Observed(state, JOB_TRY + 1))
    assert isinstance(verdict, Stop)
    assert verdict.kind is Divergence.NEWER_TRY
    assert "try 3" in verdict.reason


def test_older_try_reported_by_airflow_keeps_the_job() -> None:
    assert isinstance(decide(JOB_TRY, Observed("failed", JOB_TRY - 1)), Keep)


def test_absent_task_instance_stops_the_job() -> None:
    verdict = decide(JOB_TRY, Absent())
    assert isinstance(verdict, Stop)
    assert (verdict.kind, verdict.final_status) == (Divergence.TI_ABSENT, JobStatus.FAILED)


@pytest.mark.parametrize(
    "why",
    [
        "connection refused",
        "HTTP 500",
        "HTTP 503",
        "login failed: HTTP 401",
        "HTTP 403",
        "answer is not JSON",
    ],
)
def test_airflow_unreachable_or_unusable_never_stops(why: str) -> None:
    verdict = decide(JOB_TRY, Unknown(why))
    assert isinstance(verdict, Keep)
    assert why in verdict.why


def test_unrecognised_future_state_keeps_the_job() -> None:
    assert isinstance(decide(JOB_TRY, Observed("some_new_state", JOB_TRY)), Keep)
