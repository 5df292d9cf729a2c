"""Retention of the router DB: finished jobs and their audit rows go once old, active jobs never,
on SQLite and on real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from harness.processes import free_port, wait_until
from harness.sidecar import SidecarProcess
from reconciler.core.retention import parse_age
from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey
from router_db.models import JobEvent, JobRow

ROOT = Path(__file__).resolve().parent.parent


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
        conn.execute(update(JobRow).where(JobRow.job_id.in_(ids)).values(updated_at=then))
    return ids


def count(db: RouterDB, table: type[JobRow] | type[JobEvent]) -> int:
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
    assert count(router_db, JobRow) == 15  # a dry run deletes nothing
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


@pytest.mark.fast
@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("7s", 7)])
def test_ages_read_as_people_write_them(text: str, seconds: int) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.fast
@pytest.mark.parametrize("text", ["", "30", "d", "0d", "-1d", "1w", "1.5d", "30 days", "9999999999d"])
def test_other_ages_are_refused_with_the_forms_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="such as 30d"):
        parse_age(text)


def prune_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "reconciler.toml"
    config.write_text(f'[router_db]\nurl = "sqlite:///{tmp_path / "router.db"}"\n')
    env = {"AIRFLOW_PASSWORD": "x", "AGENTIC_SIDECAR_TOKEN": "y", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "db", "prune", *args, "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_prune_command_counts_then_deletes(tmp_path: Path) -> None:
    db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    old = submit(db, 3, status=JobStatus.FAILED, age_days=45)
    running = submit(db, 1, status=JobStatus.RUNNING, age_days=45)
    looked = prune_command(tmp_path, "--older-than", "30d", "--dry-run")
    assert looked.returncode == 0 and looked.stdout.startswith("would delete 3 job(s)"), looked.stderr
    assert all(db.get(job_id) for job_id in old)
    done = prune_command(tmp_path, "--older-than", "30d")
    assert done.returncode == 0 and done.stdout.startswith("deleted 3 job(s)"), done.stderr
    assert not any(db.get(job_id) for job_id in old) and db.get(running[0]) is not None
    refused = prune_command(tmp_path, "--older-than", "a month")
    assert refused.returncode == 2 and "such as 30d" in refused.stderr
    assert prune_command(tmp_path).returncode == 2  # no age: nothing is guessed
    db.dispose()


def test_the_leader_prunes_at_the_start_of_its_term_and_keeps_active_jobs(tmp_path: Path) -> None:
    """The sidecar as deployed: ``[retention] keep_days`` at work, no command needed."""
    db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    old = submit(db, 2, status=JobStatus.SUCCEEDED, age_days=45)
    running = submit(db, 1, status=JobStatus.RUNNING, age_days=45)
    recent = submit(db, 1, status=JobStatus.FAILED, age_days=3)
    sidecar = SidecarProcess(
        workdir=tmp_path,
        airflow_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: the loop stops nothing
        airflow_password="unused",
        agents=[],
        extra_config="[retention]\nkeep_days = 30.0\n",
    )
    with sidecar:
        wait_until(lambda: all(db.get(job_id) is None for job_id in old), timeout=20, what="old jobs pruned")
        assert db.get(running[0]) is not None and db.get(recent[0]) is not None
        assert "retention: deleted 2 job(s)" in sidecar.log_path.read_text()
    db.dispose()
