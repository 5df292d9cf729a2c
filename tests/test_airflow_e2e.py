"""End to end on a real Airflow (3.3.2, 3.1.8 and 2.11.2), a real agent and the sidecar as processes.
On the other supported versions (3.2.2, 3.0.6, 2.10.5: outside CI's matrix, for time):
``AGENTIC_AIRFLOW_VERSIONS=all ./scripts/test -m airflow tests/test_airflow_e2e.py`` (or comma-separated
versions). Each Airflow's venv comes from its lock (harness/locks.py).

One Airflow at a time: the whole stack of one version is torn down before the next one starts.
Every scenario's DAG run is triggered as soon as the stack is up, so Airflow's own latency (schedule,
start a worker, defer) is paid once, in parallel, rather than once per test.

The Airflow venvs are cached under ``~/.cache/agentic-airflow`` (created on first use, ~30 s each); every
Airflow gets a fresh database on the PostgreSQL server at 127.0.0.1:5432, a fernet key, and the sidecar's
connection stored encrypted in it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from harness.agent import AgentProcess
from harness.airflow import (
    AIRFLOW_2_VERSION,
    AIRFLOW_3_1_VERSION,
    AIRFLOW_VERSION,
    PASSWORD,
    AirflowAPI,
    AirflowServer,
    airflow_with_sidecar,
    selected_versions,
)
from harness.processes import alive, process_group, wait_until
from harness.sidecar import AgentRef, SidecarProcess

pytestmark = pytest.mark.airflow

POLL_INTERVAL = 1.0
# The default targeted read sees a deleted run by its deferred count: the rolling full check (its
# period here as by default) has no part in any stop below.
FULL_RESYNC = 300.0
STOP_BUDGET = POLL_INTERVAL + 3.0  # from a person's action to the remote tree gone and the job recorded
TREE_SIZE = 5  # the shell, a sub-shell with two sleeps, and one more sleep (tests/dags/agentic_e2e.py)
DAGS = Path(__file__).parent / "dags"
# (dag_id, run_id) of every scenario, triggered together when the stack starts.
RUNS = [
    ("e2e_stop", "mark"),
    ("e2e_clear", "clear"),
    ("e2e_delete", "deleted"),
    ("e2e_delete", "kept"),
    ("e2e_exit_codes", "exit_codes"),
    ("e2e_output", "output"),
]


@dataclass
class Stack:
    version: str
    airflow: AirflowServer
    api: AirflowAPI
    agent: AgentProcess
    sidecar: SidecarProcess

    def jobs(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        with self.sidecar.client() as client:
            response = client.get("/jobs", params={"dag_id": dag_id, "run_id": run_id})
            response.raise_for_status()
            return list(response.json()["jobs"])

    def latest_job(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any] | None:
        """The job of the task's latest try, if any was submitted."""
        tries = [j for j in self.jobs(dag_id, run_id) if j["task_id"] == task_id]
        # A run deleted and created again has two try-1 jobs: the newer one is its own.
        return max(tries, key=lambda j: (j["try_number"], j["created_at"]), default=None)

    def job(self, job_id: str) -> dict[str, Any]:
        with self.sidecar.client() as client:
            response = client.get(f"/jobs/{job_id}")
            response.raise_for_status()
            return dict(response.json())

    def agent_pid(self, job_id: str) -> int:
        response = httpx.get(
            f"{self.agent.url}/jobs/{job_id}", headers={"Authorization": f"Bearer {self.agent.token}"}
        )
        response.raise_for_status()
        return int(response.json()["pid"])


@pytest.fixture(
    scope="module",
    params=selected_versions([AIRFLOW_VERSION, AIRFLOW_3_1_VERSION, AIRFLOW_2_VERSION]),
    ids=lambda v: f"airflow-{v}",
)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    version: str = request.param
    base = tmp_path_factory.mktemp(f"e2e-airflow-{version}")
    with AgentProcess(home=base / "agent", agent_id="agent-1", grace_seconds=3.0) as agent:
        sidecar = SidecarProcess(
            workdir=base / "sidecar",
            airflow_url="",  # set once Airflow's port is known
            airflow_password=PASSWORD,
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            interval_seconds=POLL_INTERVAL,
            full_resync_seconds=FULL_RESYNC,
        )
        home = base / "airflow"
        with airflow_with_sidecar(sidecar, home=home, dags_folder=DAGS, version=version) as airflow:
            api = airflow.api()
            for dag_id, run_id in RUNS:
                api.wait_for_dag(dag_id)
                api.trigger(dag_id, run_id)
            yield Stack(version, airflow, api, agent, sidecar)


def running_job(
    stack: Stack, dag_id: str, run_id: str, task_id: str, *, try_number: int | None = None
) -> tuple[dict[str, Any], list[psutil.Process]]:
    """The RUNNING job of a deferred task (its latest try, or ``try_number``), and its whole process
    tree once every member has started."""
    ti = stack.api.wait_for_state(dag_id, run_id, task_id, {"deferred"})
    job = stack.latest_job(dag_id, run_id, task_id)
    assert job is not None, f"{dag_id}/{run_id}/{task_id} deferred without a job"
    assert job["try_number"] == (try_number if try_number is not None else ti["try_number"])
    assert job["status"] == "RUNNING"
    pid = stack.agent_pid(job["job_id"])
    wait_until(lambda: len(process_group(pid)) >= TREE_SIZE, timeout=10, what="job tree started")
    return job, process_group(pid)


def stopped(stack: Stack, job: dict[str, Any], tree: list[psutil.Process], status: str) -> Callable[[], bool]:
    """True once the job's whole tree is gone and the router DB records ``status``."""
    return lambda: not alive(tree) and stack.job(job["job_id"])["status"] == status


def assert_untouched(
    stack: Stack, job: dict[str, Any], tree: list[psutil.Process], *, seconds: float
) -> None:
    """The job's task stays deferred, the job RUNNING and every process alive for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ti = stack.api.task_instance(job["dag_id"], job["run_id"], job["task_id"])
        now = stack.job(job["job_id"])
        seen = (ti["state"], ti["try_number"], now["status"])
        assert seen == ("deferred", job["try_number"], "RUNNING"), f"task and job: {seen}, job: {now}"
        assert len(alive(tree)) == len(tree)
        time.sleep(0.5)


def test_marked_failed_task_has_its_remote_tree_stopped_and_sibling_untouched(stack: Stack) -> None:
    dag_id, run_id = "e2e_stop", "mark"
    victim, victim_tree = running_job(stack, dag_id, run_id, "victim")
    sibling, sibling_tree = running_job(stack, dag_id, run_id, "sibling")

    stack.api.mark(dag_id, run_id, "victim", "failed")
    wait_until(
        stopped(stack, victim, victim_tree, "FAILED"),
        timeout=STOP_BUDGET,
        what="victim's process tree gone and the job FAILED in the router DB",
    )
    final = stack.job(victim["job_id"])
    assert "failed" in final["reason"]
    assert final["rc"] is not None and final["rc"] < 0  # ended by a signal

    assert_untouched(stack, sibling, sibling_tree, seconds=3 * POLL_INTERVAL)

    # Marked success: stopped as well, and the router DB follows Airflow's verdict.
    stack.api.mark(dag_id, run_id, "sibling", "success")
    wait_until(
        stopped(stack, sibling, sibling_tree, "SUCCEEDED"),
        timeout=STOP_BUDGET,
        what="sibling's process tree gone and the job SUCCEEDED in the router DB",
    )
    final = stack.job(sibling["job_id"])
    assert "success" in final["reason"]
    assert final["rc"] is not None and final["rc"] < 0  # the process truth: ended by a signal


def test_cleared_deferred_task_stops_its_try_and_runs_again_as_a_new_job(stack: Stack) -> None:
    dag_id, run_id = "e2e_clear", "clear"
    victim, victim_tree = running_job(stack, dag_id, run_id, "victim")
    sibling, sibling_tree = running_job(stack, dag_id, run_id, "sibling")

    cleared = stack.api.clear(dag_id, run_id, "victim")
    assert [ti["task_id"] for ti in cleared] == ["victim"]
    wait_until(
        stopped(stack, victim, victim_tree, "FAILED"),
        timeout=STOP_BUDGET,
        what="cleared try's process tree gone and the job FAILED in the router DB",
    )
    reason = stack.job(victim["job_id"])["reason"]
    assert re.search(r"cleared|restarting|no state|newer try|on try", reason), reason

    # Airflow runs the task again: a new job for the new try, which the reconciler leaves alone.
    retry, retry_tree = running_job(stack, dag_id, run_id, "victim", try_number=victim["try_number"] + 1)
    assert retry["job_id"] != victim["job_id"]
    assert_untouched(stack, retry, retry_tree, seconds=2 * POLL_INTERVAL)
    assert_untouched(stack, sibling, sibling_tree, seconds=POLL_INTERVAL)

    for job, tree in ((retry, retry_tree), (sibling, sibling_tree)):
        stack.api.mark(dag_id, run_id, job["task_id"], "failed")
        wait_until(stopped(stack, job, tree, "FAILED"), timeout=STOP_BUDGET, what="clean-up stop")


def test_deleted_dag_run_has_its_jobs_stopped_and_other_runs_untouched(stack: Stack) -> None:
    dag_id = "e2e_delete"
    doomed, doomed_tree = running_job(stack, dag_id, "deleted", "work")
    kept, kept_tree = running_job(stack, dag_id, "kept", "work")

    stack.api.delete_run(dag_id, "deleted")
    wait_until(
        stopped(stack, doomed, doomed_tree, "FAILED"),
        timeout=STOP_BUDGET,
        what="deleted run's process tree gone and the job FAILED in the router DB",
    )
    assert "no longer exists" in stack.job(doomed["job_id"])["reason"]

    # The run triggered again under the same run_id is a new run: a new job, left alone.
    stack.api.trigger(dag_id, "deleted")
    reborn, reborn_tree = running_job(stack, dag_id, "deleted", "work")
    assert reborn["job_id"] != doomed["job_id"] and reborn["try_number"] == doomed["try_number"]
    assert reborn["ti_identity"] and reborn["ti_identity"] != doomed["ti_identity"]

    # Same DAG and task, another run: kept through several cycles, the delete's count drop included.
    assert_untouched(stack, kept, kept_tree, seconds=5 * POLL_INTERVAL)
    assert_untouched(stack, reborn, reborn_tree, seconds=POLL_INTERVAL)
    for run_id, job, tree in (("kept", kept, kept_tree), ("deleted", reborn, reborn_tree)):
        stack.api.mark(dag_id, run_id, "work", "failed")
        wait_until(stopped(stack, job, tree, "FAILED"), timeout=STOP_BUDGET, what="clean-up stop")


def test_exit_code_decides_the_airflow_task_state(stack: Stack) -> None:
    dag_id, run_id = "e2e_exit_codes", "exit_codes"
    ok = stack.api.wait_for_state(dag_id, run_id, "exit_zero", {"success", "failed"}, timeout=60)
    bad = stack.api.wait_for_state(dag_id, run_id, "exit_three", {"success", "failed"}, timeout=60)
    assert ok["state"] == "success"
    assert bad["state"] == "failed"
    jobs = {job["task_id"]: job for job in stack.jobs(dag_id, run_id)}
    assert (jobs["exit_zero"]["status"], jobs["exit_zero"]["rc"]) == ("SUCCEEDED", 0)
    assert (jobs["exit_three"]["status"], jobs["exit_three"]["rc"]) == ("FAILED", 3)


def test_the_job_id_is_in_xcom_as_soon_as_the_task_defers(stack: Stack) -> None:
    """``agentic_job_id``: pushed before deferring, so the UI, the API and later tasks find the job."""
    dag_id, run_id = "e2e_exit_codes", "exit_codes"
    stack.api.wait_for_state(dag_id, run_id, "exit_zero", {"success", "failed"}, timeout=60)
    jobs = {job["task_id"]: job for job in stack.jobs(dag_id, run_id)}
    for task_id in ("exit_zero", "exit_three"):
        response = stack.api.http.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/agentic_job_id"
        )
        response.raise_for_status()
        value = response.json()["value"]
        assert str(value).strip('"') == jobs[task_id]["job_id"], (task_id, value)
    # The "Agentic job" extra link as Airflow's API serves it (v2 wraps the links, v1 does not).
    links = stack.api.http.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/exit_zero/links").json()
    url = f"{stack.sidecar.url}/ui/jobs/{jobs['exit_zero']['job_id']}"
    assert links.get("extra_links", links) == {"Agentic job": url}, links


def test_the_remote_output_appears_in_the_task_log_while_the_task_is_deferred(stack: Stack) -> None:
    """The trigger appends the job's new output to the task's log, read here as the UI reads it
    (Airflow's REST API), while the task is still deferred; no line shows twice."""
    dag_id, run_id, task_id = "e2e_output", "output", "chatty"
    ti = stack.api.wait_for_state(dag_id, run_id, task_id, {"deferred"})
    seen: list[str] = []

    def shown() -> bool:
        log = stack.api.task_log(dag_id, run_id, task_id, ti["try_number"])
        seen[:] = re.findall(r"remote line (\d+)\b", log)
        return len(seen) >= 6

    wait_until(shown, timeout=30, what="six remote lines in the task's log")
    assert stack.api.task_instance(dag_id, run_id, task_id)["state"] == "deferred"
    numbers = [int(n) for n in seen]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # in order, none lost, none repeated
    stack.api.mark(dag_id, run_id, task_id, "success")  # clean up: the job is stopped


def test_the_optional_failure_callback_reaches_the_sidecar_from_inside_airflow(stack: Stack) -> None:
    """``enable_router_callbacks``: Airflow runs the callback when the task fails on its own (its job
    exited 3); the sidecar answers that the job has already ended, and the answer is in XCom."""
    dag_id, run_id = "e2e_exit_codes", "exit_codes"
    stack.api.wait_for_state(dag_id, run_id, "exit_three", {"failed"}, timeout=60)
    path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/exit_three/xcomEntries/router_status_notification"

    def answered() -> dict[str, Any] | None:
        response = stack.api.http.get(path)
        return response.json() if response.status_code == 200 else None

    try:
        wait_until(lambda: answered() is not None, timeout=30, what="the callback's answer in XCom")
    except TimeoutError:
        if not airflow_failed_the_try_itself(stack, dag_id, run_id, "exit_three"):
            raise
        # Airflow's scheduler failed that try itself, so no callback ran in it: the next try's must.
        stack.api.clear(dag_id, run_id, "exit_three")
        stack.api.wait_for_state(dag_id, run_id, "exit_three", {"failed"}, timeout=90)
        wait_until(lambda: answered() is not None, timeout=30, what="the callback's answer in XCom")
    value = str(answered()["value"])  # type: ignore[index]
    jobs = [job["job_id"] for job in stack.jobs(dag_id, run_id) if job["task_id"] == "exit_three"]
    assert "already_final" in value and any(job_id in value for job_id in jobs), value


def airflow_failed_the_try_itself(stack: Stack, dag_id: str, run_id: str, task_id: str) -> bool:
    """Airflow's own scheduler race, seen under load on 3.1.8 and 3.3.2: the LocalExecutor's "success"
    for the try's deferring run arrives after the try was queued to resume, and the scheduler fails
    it ("... finished with state success, but the task instance's state attribute is queued"); the
    resumed try is told to stop, and runs no callback. The sidecar takes no part in it."""
    log = stack.airflow.home / "logs-harness" / "scheduler.log"
    said = f"<TaskInstance: {dag_id}.{task_id} {run_id} [queued]> finished with state success"
    return log.exists() and said in log.read_text(encoding="utf-8", errors="replace")
