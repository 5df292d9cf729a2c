"""End to end on a real Airflow 3.3.2, a real agent and the sidecar as processes.

The Airflow venv is cached under ``~/.cache/agentic-airflow`` (created on first use, ~20 s).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from harness.agent import AgentProcess

from harness.airflow import PASSWORD, AirflowAPI, AirflowServer
from harness.sidecar import AgentRef, SidecarProcess

pytestmark = pytest.mark.airflow

POLL_INTERVAL = 1.0
TREE_SIZE = 5  # the shell, a sub-shell with two sleeps, and one more sleep (tests/dags/agentic_e2e.py)
DAGS = Path(__file__).parent / "dags"


@dataclass
class Stack:
    airflow: AirflowServer
    api: AirflowAPI
    agent: AgentProcess
    sidecar: SidecarProcess

    def jobs(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        with self.sidecar.client() as client:
            response = client.get("/jobs", params={"dag_id": dag_id, "run_id": run_id})
            response.raise_for_status()
            return {job["task_id"]: job for job in response.json()["jobs"]}

    def job(self, job_id: str) -> dict[str, Any]:
        with self.sidecar.client() as client:
            response = client.get(f"/jobs/{job_id}")
            response.raise_for_status()
            return dict(response.json())


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("e2e")
    with AgentProcess(home=base / "agent", agent_id="agent-1", grace_seconds=3.0) as agent:
        sidecar = SidecarProcess(
            workdir=base / "sidecar",
            airflow_url="",  # set once Airflow's port is known
            airflow_password=PASSWORD,
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            interval_seconds=POLL_INTERVAL,
        )
        airflow = AirflowServer(
            home=base / "airflow",
            dags_folder=DAGS,
            extra_env={
                "AIRFLOW_CONN_AGENTIC_RUN_DEFAULT": f"http://:{sidecar.token}@127.0.0.1:{sidecar.port}"
            },
        )
        try:
            airflow.start()
            sidecar.airflow_url = airflow.url
            sidecar.start()
            yield Stack(airflow, airflow.api(), agent, sidecar)
        finally:
            sidecar.stop()
            airflow.stop()


def job_tree(pid: int) -> list[psutil.Process]:
    """Every process in the job's process group (the agent starts each job as a group leader)."""
    tree = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pid:
                tree.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return tree


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    def running(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in procs if running(p)]


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:.1f} s")


def running_job(
    stack: Stack, dag_id: str, run_id: str, task_id: str
) -> tuple[dict[str, Any], list[psutil.Process]]:
    """The job of a deferred task, and its whole process tree once every member has started."""
    stack.api.wait_for_state(dag_id, run_id, task_id, {"deferred"})
    job = stack.jobs(dag_id, run_id)[task_id]
    assert job["status"] == "RUNNING"
    response = httpx.get(
        f"{stack.agent.url}/jobs/{job['job_id']}", headers={"Authorization": f"Bearer {stack.agent.token}"}
    )
    pid = response.json()["pid"]
    wait_until(lambda: len(job_tree(pid)) >= TREE_SIZE, timeout=10, what="job tree started")
    return job, job_tree(pid)


def test_marked_failed_task_has_its_remote_tree_stopped_and_sibling_untouched(stack: Stack) -> None:
    dag_id, run_id = "e2e_stop", "mark_failed"
    stack.api.wait_for_dag(dag_id)
    stack.api.trigger(dag_id, run_id)
    victim, victim_tree = running_job(stack, dag_id, run_id, "victim")
    sibling, sibling_tree = running_job(stack, dag_id, run_id, "sibling")

    budget = POLL_INTERVAL + 3.0
    stack.api.mark(dag_id, run_id, "victim", "failed")
    wait_until(
        lambda: not alive(victim_tree) and stack.job(victim["job_id"])["status"] == "FAILED",
        timeout=budget,
        what="victim's process tree gone and the job FAILED in the router DB",
    )
    final = stack.job(victim["job_id"])
    assert "failed" in final["reason"]
    assert final["rc"] is not None and final["rc"] < 0  # ended by a signal

    # The sibling was never touched: still deferred, still RUNNING, every process alive, for a while longer.
    for _ in range(int(3 * POLL_INTERVAL / 0.5)):
        assert stack.api.task_instance(dag_id, run_id, "sibling")["state"] == "deferred"
        assert stack.job(sibling["job_id"])["status"] == "RUNNING"
        assert len(alive(sibling_tree)) == len(sibling_tree)
        time.sleep(0.5)

    # Marked success: stopped as well, and the router DB follows Airflow's verdict.
    stack.api.mark(dag_id, run_id, "sibling", "success")
    wait_until(lambda: not alive(sibling_tree), timeout=budget, what="sibling's process tree gone")
    wait_until(
        lambda: stack.job(sibling["job_id"])["status"] == "SUCCEEDED",
        timeout=budget,
        what="sibling SUCCEEDED",
    )


def test_exit_code_decides_the_airflow_task_state(stack: Stack) -> None:
    dag_id, run_id = "e2e_exit_codes", "exit_codes"
    stack.api.wait_for_dag(dag_id)
    stack.api.trigger(dag_id, run_id)
    ok = stack.api.wait_for_state(dag_id, run_id, "exit_zero", {"success", "failed"}, timeout=60)
    bad = stack.api.wait_for_state(dag_id, run_id, "exit_three", {"success", "failed"}, timeout=60)
    assert ok["state"] == "success"
    assert bad["state"] == "failed"
    jobs = stack.jobs(dag_id, run_id)
    assert (jobs["exit_zero"]["status"], jobs["exit_zero"]["rc"]) == ("SUCCEEDED", 0)
    assert (jobs["exit_three"]["status"], jobs["exit_three"]["rc"]) == ("FAILED", 3)
