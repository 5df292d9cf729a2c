"""Airflow 3.3 tells the trigger when a person acts on a deferred task (``BaseTrigger.on_kill``), and
the trigger tells the sidecar: the job stops without waiting for the sidecar's poll. (A task acted on
before its trigger started has nothing to kill: the poll stops that one, as on Airflow before 3.3.)

The sidecar here polls Airflow once every five minutes, so only the trigger's report can stop a job
within the budget; each stop is still confirmed by the sidecar's own read of the task instance (the
audit trail names the push endpoint as its source). Real Airflow 3.3.2, agent and sidecar.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from harness.agent import AgentProcess
from harness.airflow import PASSWORD, AirflowAPI, AirflowServer, airflow_with_sidecar
from harness.processes import wait_until
from harness.sidecar import AgentRef, SidecarProcess

pytestmark = pytest.mark.airflow

DAGS = Path(__file__).parent / "dags"
DAG_ID, RUN_ID = "on_kill", "people"
SLOW_POLL = 300.0  # the sidecar's poll: far beyond every budget below
# Airflow's triggerer notices a person's action in two or three turns of its loop (a turn is about a
# second: the mark's trigger row is cleaned up, then its runner is told to cancel), then on_kill's
# report and the sidecar's confirming read take a fraction of a second. Measured: 1.3-4.5 s on a quiet
# machine, over 12 s once with the whole suite on two cores, all of it before on_kill was called. The
# budget stays a tenth of the poll, so only the trigger's report can meet it; the events below name
# the report as the stop's source either way.
STOP_BUDGET = SLOW_POLL / 10


@dataclass
class Stack:
    airflow: AirflowServer
    api: AirflowAPI
    sidecar: SidecarProcess

    def job_of(self, task_id: str) -> dict[str, Any]:
        with self.sidecar.client() as client:
            jobs = client.get("/jobs", params={"dag_id": DAG_ID, "run_id": RUN_ID}).json()["jobs"]
        return min((j for j in jobs if j["task_id"] == task_id), key=lambda j: j["try_number"])

    def trigger_running(self, task_id: str) -> bool:
        """The task's trigger runs on the triggerer (a task killed before that has no trigger to kill:
        only the poll sees it)."""
        logs = self.airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={RUN_ID}" / f"task_id={task_id}"
        return any("starting" in path.read_text(errors="replace") for path in logs.glob("*.trigger.*"))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.sidecar.client() as client:
            return list(client.get(f"/jobs/{job_id}/events").json()["events"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("on-kill")
    with AgentProcess(home=base / "agent", agent_id="agent-1", grace_seconds=2.0) as agent:
        sidecar = SidecarProcess(
            workdir=base / "sidecar",
            airflow_url="",
            airflow_password=PASSWORD,
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            interval_seconds=SLOW_POLL,
            full_resync_seconds=SLOW_POLL,
            api_version="v2",
        )
        with airflow_with_sidecar(sidecar, home=base / "airflow", dags_folder=DAGS) as airflow:
            api = airflow.api()
            api.wait_for_dag(DAG_ID)
            api.trigger(DAG_ID, RUN_ID)
            yield Stack(airflow, api, sidecar)


@pytest.mark.parametrize(
    ("task_id", "ended"),
    [("marked_failed", "FAILED"), ("marked_success", "SUCCEEDED"), ("cleared", "FAILED")],
)
def test_a_person_acting_on_a_deferred_task_stops_its_job_through_the_trigger(
    stack: Stack, task_id: str, ended: str
) -> None:
    stack.api.wait_for_state(DAG_ID, RUN_ID, task_id, {"deferred"})
    wait_until(lambda: stack.trigger_running(task_id), timeout=30, what=f"{task_id}'s trigger running")
    job = stack.job_of(task_id)
    assert job["status"] == "RUNNING", job
    if task_id == "cleared":
        stack.api.clear(DAG_ID, RUN_ID, task_id)
    else:
        stack.api.mark(DAG_ID, RUN_ID, task_id, "failed" if ended == "FAILED" else "success")

    def stopped() -> bool:
        return str(stack.job_of(task_id)["status"]) == ended

    took = wait_until(stopped, timeout=STOP_BUDGET, what=f"{task_id}'s job {ended} through on_kill")
    print(f"{task_id}: job {ended} {took:.2f} s after the action (sidecar poll: every {SLOW_POLL:.0f} s)")
    stopping = [e for e in stack.events(job["job_id"]) if e["new_status"] == "STOPPING"]
    # Told, not asked: the push endpoint (on_kill), or for a cleared task possibly the new try's
    # submission first (the scheduler may run it within a second); never the poll ("reconciler").
    told = {"api", "submit"} if task_id == "cleared" else {"api"}
    assert len(stopping) == 1 and stopping[0]["source"] in told, stopping


def test_execution_timeout_holds_while_the_task_is_deferred(stack: Stack) -> None:
    """Airflow does not enforce ``execution_timeout`` on a deferred task: the job carries it (the agent
    stops it when it runs out) and the deferral too (Airflow fails the task if its agent is lost)."""
    ti = stack.api.wait_for_state(DAG_ID, RUN_ID, "timed_out", {"failed"}, timeout=60)
    job = stack.job_of("timed_out")
    assert job["status"] == "FAILED" and "timeout" in str(job["reason"]), job
    started = datetime.fromisoformat(ti["start_date"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(ti["end_date"].replace("Z", "+00:00"))
    submitted = datetime.fromisoformat(str(job["created_at"]).replace("Z", "+00:00"))
    took = (ended - started).total_seconds()
    after_job = (ended - submitted).total_seconds()
    print(
        f"timed_out: task failed {took:.1f} s after it started, {after_job:.1f} s after its job was "
        "submitted (execution_timeout 8 s)"
    )
    assert took >= 8.0  # never cut short
    # The job carries what is left of execution_timeout once the task runs (Airflow's own start of a
    # task process, on two busy cores, can take most of it): from the job's submission, at most 8 s to
    # the agent's stop, then the trigger's sighting and Airflow's write.
    assert after_job < 8.0 + 15.0
