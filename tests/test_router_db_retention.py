"""Retention of the router DB: finished jobs and their audit rows go once old, active jobs never,
on SQLite and on real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey
from router_db.models import Job, JobEvent


def submit(db: RouterDB, n: int, *, status: JobStatus, age_days: float) -> list[str]:
    """``n`` jobs in ``status``, last changed ``age_days`` ago."""
    ids = []
    for _ in range(n):
        task = f"t{len(ids)}-{status}-{age_days}"
        key = TaskInstanceKey(dag_id="etl", task_id=task, run_id="manual__1", map_index=-1, try_number=1)
        job, _ = db.submit(NewJob(key, "agent-1", "true"))
        if status is not JobStatus.QUEUED:
            db.mark_running(job.job_id, source="submit")
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            db.finish(job.job_id, status=status, rc=0, reason="done", source="agent")
        ids.append(job.job_id)
    then = datetime.now(UTC) - timedelta(days=age_days)
    with db.engine.begin() as conn:
        conn.execute(update(Job).where(Job.job_id.in_(ids)).values(updated_at=then))
    return ids


def count(db: RouterDB, table: type[Job] | type[JobEvent]) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_old_finished_jobs_go_with_their_events_and_nothing_else(router_db: RouterDB) -> None:
    old_done = submit(router_db, 7, status=JobStatus.SUCCEEDED, age_days=40)
    old_failed = submit(router_db, 3, status=JobStatus.FAILED, age_days=31)
    recent = submit(router_db, 2, status=JobStatus.SUCCEEDED, age_days=2)
    old_running = submit(router_db, 2, status=JobStatus.RUNNING, age_days=90)  # a very long job
    old_queued = submit(router_db, 1, status=JobStatus.QUEUED, age_days=90)
    cutoff = datetime.now(UTC) - timedelta(days=30)

    assert router_db.prune_finished(cutoff, dry_run=True) == 10
    assert count(router_db, Job) == 15  # a dry run deletes nothing
    assert router_db.prune_finished(cutoff, batch=3) == 10  # in batches of three
    for job_id in old_done + old_failed:
        assert router_db.get(job_id) is None and router_db.events(job_id) == []
    for job_id in recent + old_running + old_queued:
        assert router_db.get(job_id) is not None and router_db.events(job_id)
    assert {j.job_id for j in router_db.active()} == set(old_running + old_queued)
    assert router_db.prune_finished(cutoff) == 0  # nothing left to do


def test_a_moment_without_a_time_zone_is_refused(router_db: RouterDB) -> None:
    with pytest.raises(ValueError, match="UTC-aware"):
        router_db.prune_finished(datetime(2026, 1, 1))
