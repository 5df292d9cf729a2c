"""Schema migrations on SQLite and PostgreSQL: old router DBs are upgraded in place, keeping their jobs."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey
from router_db.models import Base
from router_db.schema import _config, current, head

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'router.db'}"
    return str(request.getfixturevalue("postgres_url"))


def at_first_revision(url: str, *, stamped: bool) -> None:
    """A router DB of the first release, with one running job; ``stamped=False``: created before
    migrations existed (no alembic_version table)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as connection:
        command.upgrade(_config(connection), "0001")
        now = datetime.now(UTC)
        connection.execute(
            text(
                "INSERT INTO jobs (job_id, dag_id, task_id, run_id, map_index, try_number, agent_id,"
                " command, status, created_at, updated_at) VALUES ('old-job', 'd', 't', 'r', -1, 1,"
                " 'agent-1', 'sleep 1', 'RUNNING', :now, :now)"
            ),
            {"now": now},
        )
        for status in ("QUEUED", "RUNNING"):
            connection.execute(
                text(
                    "INSERT INTO job_events (job_id, at, new_status, source, reason)"
                    " VALUES ('old-job', :now, :status, 'submit', 'before the upgrade')"
                ),
                {"now": now, "status": status},
            )
        if not stamped:
            connection.execute(text("DROP TABLE alembic_version"))
    engine.dispose()


@pytest.mark.parametrize("stamped", [True, False], ids=["migrated", "pre-migrations"])
def test_an_old_router_db_is_upgraded_in_place_and_keeps_its_jobs(url: str, stamped: bool) -> None:
    at_first_revision(url, stamped=stamped)
    db = RouterDB(url)
    try:
        db.create_schema()
        db.create_schema()  # idempotent: every sidecar start runs it
        assert current(db.engine) == head()
        old = db.get("old-job")
        assert old is not None and old.status is JobStatus.RUNNING and old.ti_identity == ""
        # The audit trail survives the table rebuild (SQLite would cascade the drop into it).
        assert [e.new_status for e in db.events("old-job")] == [JobStatus.QUEUED, JobStatus.RUNNING]
        # The old job answers for its key as before; a task instance of another identity gets its own.
        again, created = db.submit(
            NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-1", "sleep 1")
        )
        assert (again.job_id, created) == ("old-job", False)
        new, created = db.submit(
            NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-1", "sleep 1", "ti-2")
        )
        assert created and new.job_id != "old-job"
    finally:
        db.dispose()


def test_replicas_starting_together_migrate_one_after_the_other(url: str, tmp_path: Path) -> None:
    at_first_revision(url, stamped=False)
    upgrades = [upgrade_command(url, tmp_path / f"replica-{i}") for i in range(4)]
    for proc in upgrades:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    db = RouterDB(url)
    try:
        assert current(db.engine) == head()
        assert db.get("old-job") is not None and len(db.events("old-job")) == 2
    finally:
        db.dispose()


def upgrade_command(url: str, workdir: Path) -> subprocess.Popen[str]:
    """``python -m reconciler db upgrade`` against ``url``, started (not awaited)."""
    workdir.mkdir()
    config = workdir / "reconciler.toml"
    config.write_text(f'[router_db]\nurl = "{url}"\n')
    env = {"AIRFLOW_PASSWORD": "x", "AGENTIC_SIDECAR_TOKEN": "y", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", "db", "upgrade", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_models_match_the_migrations(url: str) -> None:
    db = RouterDB(url)
    try:
        db.create_schema()
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
    finally:
        db.dispose()


def test_the_db_upgrade_command_migrates_and_says_where_it_is(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    at_first_revision(url, stamped=False)
    out, err = upgrade_command(url, tmp_path / "cli").communicate(timeout=60)
    assert out.strip() == f"router DB at revision {head()} (this version: {head()})", err
