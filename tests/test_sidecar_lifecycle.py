"""The sidecar process's life: pending stops survive restarts, SIGTERM finishes stops under way."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import psutil

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess
from router_db import JobStatus, RouterDB


def beside(agent: AgentProcess, tmp_path: Path) -> SidecarProcess:
    """A sidecar for ``agent`` whose Airflow is unreachable: only pending stops act."""
    return SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=f"http://127.0.0.1:{free_port()}",
        airflow_password="unused",
        agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
        interval_seconds=0.2,
    )


def test_sigterm_lets_a_stop_under_way_finish_and_logs_are_json(tmp_path: Path) -> None:
    # grace 3 s and a job that ignores SIGTERM: the agent answers the stop only after SIGKILL.
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="a-token", grace_seconds=3.0) as agent:
        sidecar = beside(agent, tmp_path)
        sidecar.start()
        try:
            with sidecar.client() as client:
                body = {
                    "command": "trap '' TERM; sleep 60",
                    "agent_id": "agent-1",
                    "dag_id": "d",
                    "task_id": "t",
                    "run_id": "r",
                    "try_number": 1,
                }
                job_id = client.post("/jobs", json=body).json()["job_id"]
            pid = httpx.get(f"{agent.url}/jobs/{job_id}", headers={"Authorization": "Bearer a-token"}).json()[
                "pid"
            ]
            # Record a stop intent as a reconciler would have; the running sidecar resumes it.
            db = RouterDB(f"sqlite:///{sidecar.workdir / 'router.db'}")
            db.request_stop(
                job_id, stop_status=JobStatus.FAILED, reason="task instance is failed", source="test"
            )
            time.sleep(1.0)  # the stop is now waiting on the agent's grace period
            assert db.get(job_id).status is JobStatus.STOPPING  # type: ignore[union-attr]
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.proc.wait(timeout=30) == 0
        finally:
            sidecar.stop()
        done = db.get(job_id)
        db.dispose()
        assert done is not None and done.status is JobStatus.FAILED and done.rc == -9
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    lines = [json.loads(line) for line in sidecar.log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, "the sidecar wrote no JSON log lines"
    stopped = [
        line for line in lines if line.get("action") == "stop" and line["msg"].startswith("job stopped")
    ]
    assert stopped and stopped[0]["job_id"] == job_id and stopped[0]["agent_id"] == "agent-1"
    assert any("shutting down" in line["msg"] for line in lines)
    assert all(set(line) >= {"ts", "level", "logger", "msg"} for line in lines)


def test_a_second_sigterm_stops_the_sidecar_at_once_and_the_stop_resumes_after_restart(
    tmp_path: Path,
) -> None:
    """The first SIGTERM waits for the stop under way (here: an agent grace of 8 s); a person who sends
    another does not want to wait. The stop stays STOPPING in the router DB and finishes after a start."""
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="a-token", grace_seconds=8.0) as agent:
        sidecar = beside(agent, tmp_path)
        sidecar.start()
        try:
            with sidecar.client() as client:
                body = {"command": "trap '' TERM; sleep 120", "agent_id": "agent-1"}
                body |= {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1}
                job_id = client.post("/jobs", json=body).json()["job_id"]
            db = RouterDB(f"sqlite:///{sidecar.workdir / 'router.db'}")
            db.request_stop(
                job_id, stop_status=JobStatus.FAILED, reason="task instance is failed", source="test"
            )
            time.sleep(1.0)  # the stop now waits on the agent's 8 s grace period
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert sidecar.proc.poll() is None, "the first SIGTERM waits for the stop under way"
            second = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.proc.wait(timeout=15) == 1
            took = time.monotonic() - second
            assert took < 5.0, f"the sidecar took {took:.1f} s to exit after the second SIGTERM"
            assert db.get(job_id).status is JobStatus.STOPPING  # type: ignore[union-attr]
            assert "second signal" in sidecar.log_path.read_text()
        finally:
            sidecar.stop()
        sidecar.start()  # the stop resumes: SIGKILL after the agent's grace, then FAILED
        try:
            deadline = time.monotonic() + 60
            while db.get(job_id).status is JobStatus.STOPPING and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.2)
            assert db.get(job_id).status is JobStatus.FAILED  # type: ignore[union-attr]
        finally:
            sidecar.stop()
            db.dispose()
