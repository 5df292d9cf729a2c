"""The router DB's queries and status transitions, on SQLite and on real PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from router_db import JobStatus, NewJob, RouterDB, StaleTransition, TaskInstanceKey

KEY = TaskInstanceKey(dag_id="etl", task_id="extract", run_id="manual__1", map_index=-1, try_number=1)


def _submit(db: RouterDB, key: TaskInstanceKey = KEY) -> str:
    job, created = db.submit(NewJob(key, "agent-1", "sleep 60"))
    assert created
    return job.job_id


def test_submit_creates_a_queued_job_findable_by_its_task_instance_key(router_db: RouterDB) -> None:
    job_id = _submit(router_db)
    found = router_db.find(KEY)
    assert found is not None and found.job_id == job_id
    assert found.status is JobStatus.QUEUED
    assert [e.new_status for e in router_db.events(job_id)] == [JobStatus.QUEUED]


def test_second_submit_of_the_same_try_returns_the_existing_job(router_db: RouterDB) -> None:
    job_id = _submit(router_db)
    again, created = router_db.submit(NewJob(KEY, "agent-2", "other"))
    assert not created
    assert again.job_id == job_id and again.agent_id == "agent-1"


def test_each_try_and_map_index_is_its_own_job(router_db: RouterDB) -> None:
    first = _submit(router_db)
    second = _submit(
        router_db,
        TaskInstanceKey(dag_id="etl", task_id="extract", run_id="manual__1", map_index=-1, try_number=2),
    )
    mapped = _submit(
        router_db,
        TaskInstanceKey(dag_id="etl", task_id="extract", run_id="manual__1", map_index=3, try_number=1),
    )
    assert len({first, second, mapped}) == 3
    latest = router_db.find_latest(dag_id="etl", task_id="extract", run_id="manual__1")
    assert latest is not None and latest.job_id == second


def test_stop_intent_then_finish_is_recorded_with_an_audit_trail(router_db: RouterDB) -> None:
    job_id = _submit(router_db)
    router_db.mark_running(job_id, source="submit")
    stopping = router_db.request_stop(
        job_id, stop_status=JobStatus.FAILED, reason="task instance is failed", source="reconciler"
    )
    assert stopping.status is JobStatus.STOPPING and stopping.stop_status is JobStatus.FAILED
    assert stopping.stop_requested_at is not None
    done = router_db.finish(
        job_id, status=JobStatus.FAILED, rc=-15, reason="task instance is failed", source="reconciler"
    )
    assert (done.status, done.rc) == (JobStatus.FAILED, -15)
    assert done.finished_at is not None and done.finished_at.tzinfo is not None
    trail = [(e.old_status, e.new_status, e.source) for e in router_db.events(job_id)]
    assert trail == [
        (None, JobStatus.QUEUED, "submit"),
        (JobStatus.QUEUED, JobStatus.RUNNING, "submit"),
        (JobStatus.RUNNING, JobStatus.STOPPING, "reconciler"),
        (JobStatus.STOPPING, JobStatus.FAILED, "reconciler"),
    ]


def test_final_status_cannot_change_and_the_refusal_changes_nothing(router_db: RouterDB) -> None:
    job_id = _submit(router_db)
    router_db.finish(job_id, status=JobStatus.SUCCEEDED, rc=0, reason="exited", source="agent")
    with pytest.raises(StaleTransition):
        router_db.request_stop(job_id, stop_status=JobStatus.FAILED, reason="late", source="reconciler")
    with pytest.raises(StaleTransition):
        router_db.finish(job_id, status=JobStatus.FAILED, rc=1, reason="late", source="reconciler")
    job = router_db.get(job_id)
    assert job is not None and (job.status, job.rc) == (JobStatus.SUCCEEDED, 0)
    assert len(router_db.events(job_id)) == 2


def test_active_lists_queued_running_and_stopping_only(router_db: RouterDB) -> None:
    queued = _submit(router_db, TaskInstanceKey(dag_id="d", task_id="a", run_id="r"))
    running = _submit(router_db, TaskInstanceKey(dag_id="d", task_id="b", run_id="r"))
    stopping = _submit(router_db, TaskInstanceKey(dag_id="d", task_id="c", run_id="r"))
    done = _submit(router_db, TaskInstanceKey(dag_id="d", task_id="e", run_id="r"))
    router_db.mark_running(running, source="t")
    router_db.request_stop(stopping, stop_status=JobStatus.FAILED, reason="x", source="t")
    router_db.finish(done, status=JobStatus.FAILED, rc=1, reason="x", source="t")
    assert {j.job_id for j in router_db.active()} == {queued, running, stopping}
    assert [j.job_id for j in router_db.search(statuses=[JobStatus.FAILED])] == [done]


def test_racing_transitions_have_exactly_one_winner(router_db: RouterDB) -> None:
    job_id = _submit(router_db)
    router_db.mark_running(job_id, source="t")

    def finish(status: JobStatus) -> bool:
        try:
            router_db.finish(job_id, status=status, rc=0, reason="race", source="t")
            return True
        except StaleTransition:
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(finish, [JobStatus.SUCCEEDED, JobStatus.FAILED] * 4))
    assert results.count(True) == 1
    assert len(router_db.events(job_id)) == 3


def test_naive_datetimes_are_refused(router_db: RouterDB) -> None:
    from datetime import datetime

    from router_db.models import UTCDateTime

    with pytest.raises(ValueError, match="naive"):
        UTCDateTime().process_bind_param(datetime(2026, 1, 1), router_db.engine.dialect)


def test_import_running_records_many_jobs_with_their_audit_rows(router_db: RouterDB) -> None:
    new = [
        NewJob(TaskInstanceKey(dag_id="d", task_id=f"t{i}", run_id="r"), "agent-1", "sleep 1")
        for i in range(500)
    ]
    ids = router_db.import_running(new, source="import")
    assert len(set(ids)) == 500
    active = router_db.active()
    assert {j.job_id for j in active} == set(ids)
    assert all(j.status is JobStatus.RUNNING for j in active)
    assert [e.new_status for e in router_db.events(ids[0])] == [JobStatus.RUNNING]
