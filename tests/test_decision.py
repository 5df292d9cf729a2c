"""Every row of the design's decision table, without a network."""

from __future__ import annotations

import pytest

from reconciler.core.decision import Absent, Divergence, Keep, Observed, Stop, Unknown, decide
from router_db import JobStatus

pytestmark = pytest.mark.fast

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


# --- a DAG run deleted and created again under the same run_id --------------------------------------


@pytest.mark.parametrize("ti_try", [JOB_TRY - 1, JOB_TRY])
@pytest.mark.parametrize("state", ["running", "deferred", "queued"])
def test_another_task_instance_under_the_jobs_key_stops_the_job(ti_try: int, state: str) -> None:
    # The re-created run's task runs try 1 (or the same try as the old job): not this job's.
    verdict = decide(JOB_TRY, Observed(state, ti_try, "new-ti"), job_identity="old-ti")
    assert isinstance(verdict, Stop)
    assert (verdict.kind, verdict.final_status) == (Divergence.TI_REPLACED, JobStatus.FAILED)


def test_a_try_that_ended_with_a_new_id_is_named_by_its_state() -> None:
    # Airflow 3 gives a cleared task instance a new id at once: "cleared", not "replaced".
    verdict = decide(JOB_TRY, Observed("restarting", JOB_TRY, "new-ti"), job_identity="old-ti")
    assert isinstance(verdict, Stop) and verdict.kind is Divergence.TI_CLEARED


@pytest.mark.parametrize(("job_identity", "seen"), [("ti-1", "ti-1"), ("", "ti-1"), ("ti-1", None)])
def test_the_same_or_an_unknown_identity_changes_nothing(job_identity: str, seen: str | None) -> None:
    assert isinstance(decide(JOB_TRY, Observed("deferred", JOB_TRY, seen), job_identity=job_identity), Keep)


def test_identities_of_two_kinds_say_nothing() -> None:
    # A job submitted on Airflow 2 still running after an upgrade to Airflow 3.
    observed = Observed("deferred", JOB_TRY, "01970f5e-7a1b-7c3d-8e4f-123456789abc")
    airflow_2 = "logical_date:2026-11-29T10:00:00.000000Z"
    assert isinstance(decide(JOB_TRY, observed, job_identity=airflow_2), Keep)


def test_the_operator_and_the_reconciler_write_airflow_2_identities_alike() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from agentic_airflow.sidecar_client import logical_date_identity as operator_side
    from reconciler.airflow.task_instances import logical_date_identity as reconciler_side

    for moment in (
        datetime(2026, 11, 29, 10, 0, tzinfo=UTC),
        datetime(2026, 11, 29, 11, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2))),
    ):
        assert operator_side(moment) == reconciler_side(moment)
