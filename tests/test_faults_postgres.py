"""PostgreSQL restarted under the running sidecar: it keeps serving, counts the outage, reconnects.

The test starts its own PostgreSQL instance (``initdb`` in a temporary directory, a free loopback
port, trust auth), never the machine's server on 5432. As root, the server binaries run as the
``postgres`` OS user. The sidecar and the agent are real processes; Airflow is the stand-in of
``bench.standins`` served from a thread. Every wait is bounded.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from router_db import JobStatus, RouterDB


def postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


class OwnPostgres:
    """A throwaway PostgreSQL server on a free loopback port, in a temporary directory."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="agentic-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            os.chmod(self.root, 0o700)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self._as, str(self.bindir / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr or done.stdout}")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", action, *extra)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        self._pg_ctl("start")
        admin = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text('CREATE DATABASE "router"'))
        admin.dispose()

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop_server(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def start_server(self) -> None:
        self._pg_ctl("start")

    def url(self, database: str = "router") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._pg_ctl("stop", "-m", "immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    server = OwnPostgres(bindir)
    try:
        server.init()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    for i in range(10):
        served.standin.add("d", f"r{i}", "t", -1, state="running", try_number=1)
    served.start()
    yield served
    served.stop()


def counter(sidecar: SidecarProcess, result: str) -> float:
    body = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    found = re.search(rf'^reconciler_cycles_total\{{result="{result}"\}} ([0-9.e+]+)$', body, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for(what: str, check: object, timeout: float) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.1)


def submit(client: httpx.Client, i: int) -> str:
    body = {
        "command": "sleep 60",
        "agent_id": "agent-1",
        "dag_id": "d",
        "task_id": "t",
        "run_id": f"r{i}",
        "map_index": -1,
        "try_number": 1,
    }
    answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def test_postgres_restarted_under_the_running_sidecar_it_reconnects_and_continues(
    tmp_path: Path, own_postgres: OwnPostgres, airflow: ServedAirflow
) -> None:
    agent = AgentProcess(tmp_path / "agent", agent_id="agent-1", token="a-token")
    agent.start()
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
        db_url=own_postgres.url(),
        api_version="v2",
        interval_seconds=0.2,
    )
    db: RouterDB | None = None
    try:
        sidecar.start()
        with sidecar.client() as client:
            before = [submit(client, i) for i in range(3)]
            wait_for("ok cycles", lambda: counter(sidecar, "ok") >= 3, timeout=10)

            own_postgres.restart()  # pg_ctl restart -m fast: every pooled connection is cut
            assert httpx.get(f"{sidecar.url}/healthz", timeout=5).status_code == 200
            ok = counter(sidecar, "ok")
            wait_for("ok cycles after the restart", lambda: counter(sidecar, "ok") >= ok + 3, timeout=15)
            before.append(submit(client, 3))

            # A fast restart is over within a cycle or two; hold the server down for a while as
            # well, so that cycles meet the outage for certain.
            own_postgres.stop_server()
            down_at = counter(sidecar, "db_error")
            wait_for("db_error cycles", lambda: counter(sidecar, "db_error") >= down_at + 3, timeout=10)
            assert httpx.get(f"{sidecar.url}/healthz", timeout=5).status_code == 200  # still serving
            assert httpx.get(f"{sidecar.url}/readyz", timeout=10).status_code == 503  # router DB down
            assert sidecar.proc is not None and sidecar.proc.poll() is None  # no crash
            own_postgres.start_server()

            ok = counter(sidecar, "ok")
            wait_for("ok cycles again", lambda: counter(sidecar, "ok") >= ok + 3, timeout=15)
            wait_for(
                "ready again",
                lambda: httpx.get(f"{sidecar.url}/readyz", timeout=10).status_code == 200,
                timeout=15,
            )
            after = [submit(client, i) for i in range(4, 7)]
            assert client.get(f"/jobs/{before[0]}").status_code == 200

        db = RouterDB(own_postgres.url())
        jobs = {job_id: db.get(job_id) for job_id in before + after}
        assert all(job is not None and job.status is JobStatus.RUNNING for job in jobs.values()), jobs
        assert len(db.active()) == 7  # no rows lost, none doubled
        assert sidecar.proc is not None and sidecar.proc.poll() is None
    finally:
        sidecar.stop()
        agent.stop()
        if db is not None:
            db.dispose()
