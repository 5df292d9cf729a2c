"""Faults around a stop, with real processes: the sidecar killed mid-stop, the agent down for a while.

Airflow is the in-process stand-in of ``bench.standins`` (REST API v2, recorded answers) served on
loopback from a thread; the agent and the sidecar are real processes. Every wait is bounded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from harness.agent import AgentProcess
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from router_db import JobRecord, JobStatus, RouterDB

AGENT_DOWN_SECONDS = 60.0  # the outage the issue names; backoff caps at 5 s
KEY = ("d", "r", "t", -1)  # (dag_id, run_id, task_id, map_index) of the one task instance


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    served.standin.add(*KEY, state="running", try_number=1)
    served.start()
    yield served
    served.stop()


def sidecar_for(workdir: Path, airflow: ServedAirflow, agent: AgentProcess) -> SidecarProcess:
    return SidecarProcess(
        workdir=workdir,
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
        api_version="v2",
        interval_seconds=0.2,
        # Restarted, the sidecar takes its killed predecessor's lease back at once (the same replica: its
        # identity is kept beside the SQLite router DB); a short lease only bounds the wait if it did not.
        lease_seconds=2.0,
    )


def submit(sidecar: SidecarProcess) -> str:
    dag_id, run_id, task_id, map_index = KEY
    body = {
        "command": "sleep 600",  # outlives every outage these tests make
        "agent_id": "agent-1",
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": run_id,
        "map_index": map_index,
        "try_number": 1,
    }
    with sidecar.client() as client:
        answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def agent_pid(agent: AgentProcess, job_id: str) -> int:
    answer = httpx.get(f"{agent.url}/jobs/{job_id}", headers={"Authorization": f"Bearer {agent.token}"})
    return int(answer.json()["pid"])


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not {what} within {timeout} s")


def status(db: RouterDB, job_id: str) -> JobStatus:
    job = db.get(job_id)
    assert job is not None
    return job.status


def stop_retries(sidecar: SidecarProcess) -> float:
    text = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    found = re.search(r'^reconciler_stop_requests_total\{outcome="retry"\} ([0-9.]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def assert_stopped_exactly_once(db: RouterDB, job: JobRecord, pid: int) -> None:
    statuses = [e.new_status for e in db.events(job.job_id)]
    assert statuses.count(JobStatus.STOPPING) == 1, statuses  # the intent, recorded once
    assert statuses.count(JobStatus.FAILED) == 1, statuses  # the outcome, recorded once
    assert statuses[-1] is JobStatus.FAILED and statuses.index(JobStatus.STOPPING) < statuses.index(
        JobStatus.FAILED
    )
    assert job.status is JobStatus.FAILED and job.rc is not None and job.rc < 0
    assert job.reason and "failed" in job.reason
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sidecar_sigkilled_between_stop_intent_and_agent_call_finishes_the_stop_once_after_restart(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    agent = AgentProcess(tmp_path / "agent", agent_id="agent-1", token="a-token")
    agent.start()
    sidecar = sidecar_for(tmp_path / "sidecar", airflow, agent)
    db = RouterDB(f"sqlite:///{sidecar.workdir / 'router.db'}")
    restarted_agent: AgentProcess | None = None
    try:
        sidecar.start()
        job_id = submit(sidecar)
        pid = agent_pid(agent, job_id)
        # The window made deterministic: the agent is unreachable, so the intent is recorded and
        # every agent call fails until the sidecar dies. The job itself keeps running.
        agent.kill()
        airflow.mark(KEY, "failed")
        wait_until("STOPPING", lambda: status(db, job_id) is JobStatus.STOPPING, timeout=15)
        wait_until("a failed agent call", lambda: stop_retries(sidecar) >= 1, timeout=15)
        assert sidecar.proc is not None
        sidecar.proc.kill()  # SIGKILL, that PID only
        sidecar.proc.wait(timeout=10)
        sidecar.proc = None
        assert status(db, job_id) is JobStatus.STOPPING and psutil.pid_exists(pid)

        restarted_agent = AgentProcess(
            tmp_path / "agent", agent_id="agent-1", token="a-token", port=agent.port
        )
        restarted_agent.start()  # adopts the still-running job
        sidecar.start()
        wait_until("FAILED", lambda: status(db, job_id) is JobStatus.FAILED, timeout=30)
        time.sleep(1.0)  # a few more cycles: nothing is recorded twice
        job = db.get(job_id)
        assert job is not None
        assert_stopped_exactly_once(db, job, pid)
    finally:
        sidecar.stop()
        (restarted_agent or agent).stop()
        db.dispose()


def test_a_stop_pending_while_the_agent_is_down_is_retried_and_completes_once_when_it_returns(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    agent = AgentProcess(tmp_path / "agent", agent_id="agent-1", token="a-token")
    agent.start()
    sidecar = sidecar_for(tmp_path / "sidecar", airflow, agent)
    db = RouterDB(f"sqlite:///{sidecar.workdir / 'router.db'}")
    restarted_agent: AgentProcess | None = None
    try:
        sidecar.start()
        job_id = submit(sidecar)
        pid = agent_pid(agent, job_id)
        agent.kill()
        airflow.mark(KEY, "failed")
        wait_until("STOPPING", lambda: status(db, job_id) is JobStatus.STOPPING, timeout=15)
        time.sleep(AGENT_DOWN_SECONDS)
        retries = stop_retries(sidecar)
        # Calls with backoff (0.2 s doubling, capped), resumed every cycle: several, but not a flood.
        assert 2 <= retries <= AGENT_DOWN_SECONDS, retries
        assert status(db, job_id) is JobStatus.STOPPING

        restarted_agent = AgentProcess(
            tmp_path / "agent", agent_id="agent-1", token="a-token", port=agent.port
        )
        restarted_agent.start()
        took = wait_until("FAILED", lambda: status(db, job_id) is JobStatus.FAILED, timeout=20)
        assert took < 10, took  # the next attempt comes within the backoff cap
        time.sleep(1.0)
        job = db.get(job_id)
        assert job is not None
        assert_stopped_exactly_once(db, job, pid)
    finally:
        sidecar.stop()
        (restarted_agent or agent).stop()
        db.dispose()
