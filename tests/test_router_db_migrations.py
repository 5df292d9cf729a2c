"""Schema migrations on SQLite and PostgreSQL: old router DBs are upgraded in place, keeping their jobs.

``python -m reconciler db upgrade`` migrates; the sidecar (``run``, ``once``) only creates an empty router
DB, and refuses, changing nothing, one at another revision unless ``[router_db] upgrade_on_start``.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess
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
    return reconciler_command(url, workdir, "db", "upgrade")


def reconciler_command(url: str, workdir: Path, *argv: str) -> subprocess.Popen[str]:
    """``python -m reconciler <argv> --config <workdir>/reconciler.toml`` on router DB ``url`` (its
    Airflow unreachable, its port free), started (not awaited)."""
    workdir.mkdir()
    config = workdir / "reconciler.toml"
    config.write_text(
        f'[airflow]\nbase_url = "http://127.0.0.1:{free_port()}"\napi_version = "v2"\n'
        f'[router_db]\nurl = "{url}"\n[http]\nport = {free_port()}\n'
    )
    env = {"AIRFLOW_PASSWORD": "x", "AGENTIC_SIDECAR_TOKEN": "y", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", *argv, "--config", str(config)],
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


# --- the previous release's router DB (revision 0002) ---------------------------------------------------

PREVIOUS = "0002"
RUNNING_JOB = "a0" * 16
ENDED_JOB = "b0" * 16


def at_previous_release(url: str) -> None:
    """A router DB as the previous release left it: migrated to 0002 by its migrations (not today's
    models), with a running job, an ended one of a re-created run, their audit trail and a lease."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    now = datetime.now(UTC)
    with engine.begin() as connection:
        command.upgrade(_config(connection), PREVIOUS)
        insert_job = text(
            "INSERT INTO jobs (job_id, dag_id, task_id, run_id, map_index, try_number, ti_identity,"
            " agent_id, command, status, rc, reason, created_at, updated_at, finished_at)"
            " VALUES (:id, 'd', 't', 'r', 3, 2, :ti, 'agent-1', 'echo é', :status, :rc, :reason,"
            " :now, :now, :finished)"
        )
        connection.execute(
            insert_job,
            {
                "id": RUNNING_JOB,
                "ti": "",
                "status": "RUNNING",
                "rc": None,
                "reason": None,
                "now": now,
                "finished": None,
            },
        )
        connection.execute(
            insert_job,
            {
                "id": ENDED_JOB,
                "ti": "ti-2",
                "status": "FAILED",
                "rc": -9,
                "reason": "TI failed",
                "now": now,
                "finished": now,
            },
        )
        for job_id, statuses in (
            (RUNNING_JOB, ["QUEUED", "RUNNING"]),
            (ENDED_JOB, ["QUEUED", "RUNNING", "FAILED"]),
        ):
            for old, new in zip([None, *statuses], statuses, strict=False):
                connection.execute(
                    text(
                        "INSERT INTO job_events (job_id, at, old_status, new_status, source, reason)"
                        " VALUES (:job, :now, :old, :new, 'submit', 'previous release')"
                    ),
                    {"job": job_id, "now": now, "old": old, "new": new},
                )
        connection.execute(
            text("INSERT INTO leases (name, holder, expires_at) VALUES ('loop', 'old-replica', :now)"),
            {"now": now},
        )
    engine.dispose()


def contents(url: str) -> dict[str, Any]:
    """Every row of every table but alembic_version, the tables' names, and the revision."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            tables = sorted(set(inspect(connection).get_table_names()) - {"alembic_version"})
            found: dict[str, Any] = {
                "tables": tables,
                "revision": MigrationContext.configure(connection).get_current_revision(),
            }
            for table in tables:
                found[table] = connection.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()
            return found
    finally:
        engine.dispose()


def kept(after: list[Any], before: list[Any]) -> list[tuple[Any, ...]]:
    """The upgraded rows cut to the previous release's columns (later revisions add theirs after)."""
    width = len(before[0]) if before else 0
    return [tuple(row[:width]) for row in after]


def test_db_upgrade_brings_the_previous_release_to_this_one_keeping_every_row(
    url: str, tmp_path: Path
) -> None:
    at_previous_release(url)
    before = contents(url)
    assert before["revision"] == PREVIOUS and "agents" not in before["tables"]
    out, err = upgrade_command(url, tmp_path / "cli").communicate(timeout=60)
    assert out.strip() == f"router DB at revision {head()} (this version: {head()})", err
    after = contents(url)
    assert after["revision"] == head()
    assert after["tables"] == sorted([*before["tables"], "agents"])
    for table in before["tables"]:
        assert kept(after[table], before[table]) == before[table], table
    assert not any(row.at_most_once for row in after["jobs"])  # revision 0006: none asked to be fenced
    assert after["agents"] == []
    assert len(after["job_events"]) == 5 and len(after["jobs"]) == 2


def refusal_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if "router DB schema error" in line]
    return line


@pytest.mark.parametrize("argv", [["run"], ["once"]], ids=["run", "once"])
def test_a_sidecar_refuses_the_previous_release_schema_and_changes_nothing(
    url: str, tmp_path: Path, argv: list[str]
) -> None:
    at_previous_release(url)
    before = contents(url)
    proc = reconciler_command(url, tmp_path / "sidecar", *argv)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    config = tmp_path / "sidecar" / "reconciler.toml"
    assert refusal_line(err) == (
        f"router DB schema error: the router DB is at revision {PREVIOUS}, this version needs revision"
        f" {head()}; run: python -m reconciler db upgrade --config {config}"
    )
    assert "Traceback" not in err
    assert contents(url) == before  # revision, tables and rows as they were


def test_a_router_db_from_before_migrations_is_refused_at_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    at_first_revision(url, stamped=False)
    before = contents(url)
    proc = reconciler_command(url, tmp_path / "sidecar", "run")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    line = refusal_line(err)
    assert "tables but no revision" in line and head() in line and "db upgrade --config" in line
    assert contents(url) == before and before["revision"] is None


def test_a_router_db_of_a_newer_release_is_refused_by_start_and_by_db_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'router.db'}"
    db = RouterDB(url)
    db.create_schema()
    with db.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    db.dispose()
    for name, argv in (("run", ["run"]), ("upgrade", ["db", "upgrade"])):
        proc = reconciler_command(url, tmp_path / name, *argv)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        line = refusal_line(err)
        assert "revision 0999" in line and head() in line and "older than its database" in line
        assert "db upgrade --config" not in line  # upgrading cannot help: a newer release must run
    assert contents(url)["revision"] == "0999"


def sidecar_on(url: str, workdir: Path, agents: list[AgentRef] | None = None) -> SidecarProcess:
    return SidecarProcess(
        workdir=workdir,
        airflow_url=f"http://127.0.0.1:{free_port()}",
        airflow_password="unused",
        agents=agents or [],
        db_url=url,
        api_version="v2",
    )


def test_upgrade_on_start_migrates_the_previous_release_and_serves_its_jobs(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_previous_release(url)
    before = contents(url)
    monkeypatch.setenv("AGENTIC_RECONCILER_ROUTER_DB_UPGRADE_ON_START", "true")
    # The job's agent is still configured (a job whose agent is not would be ended, with a reason).
    agents = [AgentRef("agent-1", f"http://127.0.0.1:{free_port()}", "unused-token")]
    with sidecar_on(url, tmp_path / "sidecar", agents) as sidecar, sidecar.client() as client:
        job = client.get(f"/jobs/{RUNNING_JOB}")
        assert job.status_code == 200, job.text
        assert job.json()["status"] == "RUNNING"
    after = contents(url)
    assert after["revision"] == head() and "agents" in after["tables"]
    for table in ("jobs", "job_events"):
        assert kept(after[table], before[table]) == before[table], table


def test_an_empty_router_db_is_created_when_sidecars_start_together(url: str, tmp_path: Path) -> None:
    sidecars = [sidecar_on(url, tmp_path / f"replica-{i}") for i in range(3)]
    try:
        with ThreadPoolExecutor(len(sidecars)) as starting:
            list(starting.map(SidecarProcess.start, sidecars))  # each waits for its /healthz
        assert contents(url)["revision"] == head()
        with sidecars[0].client() as client:
            assert client.get("/jobs").status_code == 200
    finally:
        for sidecar in sidecars:
            sidecar.stop()
