"""Lost agents on a real Airflow 3.3.2: three agents, the sidecar and Airflow as processes.

One DAG run (tests/dags/agentic_fleet.py) holds a long job on each agent, triggered as soon as the
stack is up. A crashed agent (the agent, its job's supervisor and the job all SIGKILLed, as when a
VM dies) and a paused one (SIGSTOP: a hung VM) each get their task failed once the agent has been
silent for ``[fleet] lost_after_seconds``, never before; the paused agent's job, still running when
it answers again, is stopped by the orphan sweep; agent-b beside them is never touched.

Every bound below is the sum of the steps between the event and what the test observes. The
figures measured are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from agentic_airflow.polling import OUTPUT_READ_SECONDS
from harness.agent import AgentProcess
from harness.airflow import PASSWORD, AirflowAPI, AirflowServer, airflow_with_sidecar
from harness.processes import alive, process_group, wait_until
from harness.sidecar import AgentRef, SidecarProcess

pytestmark = pytest.mark.airflow

DAGS = Path(__file__).parent / "dags"
DAG_ID, RUN_ID = "fleet_loss", "fleet"
AGENTS = ("agent-a", "agent-b", "agent-c")
TREE_SIZE = 5  # the shell, a sub-shell with two sleeps, one more sleep (tests/dags/agentic_fleet.py)

POLL_INTERVAL = 1.0  # [poll] interval_seconds
TRIGGER_POLL = 1.0  # the tasks' poll_interval: how often the trigger asks the sidecar about its job
LOST_AFTER = 6.0
CHECK_INTERVAL = 0.5
CHECK_TIMEOUT = 2.0
ORPHAN_SWEEP = 30.0  # longer than the test: only the sweep on a lost agent's return can stop its job
FLEET_CONFIG = (
    f"[leader]\nlease_seconds = {LOST_AFTER - 1}\n"  # below lost_after_seconds, as it must be
    "[fleet]\n"
    f"lost_after_seconds = {LOST_AFTER}\n"
    f"check_interval_seconds = {CHECK_INTERVAL}\n"
    f"check_timeout_seconds = {CHECK_TIMEOUT}\n"
    f"orphan_sweep_seconds = {ORPHAN_SWEEP}\n"
)
OBSERVE = 0.1  # the test's own reading cadence

# Airflow's trigger runner hands fired events to the triggerer's supervisor once a second, which
# then writes them to the metadata DB: 1 s, plus 1 s for that write and the test's read; and far more
# on two cores that also run the rest of the suite (3.8 s seen there, then 8.1 s and 9.0 s on
# 2026-12-07 with more of the suite's processes beside it).
AIRFLOW_MARGIN = 10.0
# From the router DB ending a job to its task leaving deferred: the trigger's long-poll answers at once,
# unless the trigger is reading the job's output from an agent that hangs (paused): that read gives up
# after OUTPUT_READ_SECONDS. Then Airflow.
TRIGGER_SIGHTING = max(TRIGGER_POLL, OUTPUT_READ_SECONDS) + AIRFLOW_MARGIN
# A crashed agent refuses connections at once. The fleet ticks on its own clock (every half check
# interval): the first check sent lost_after_seconds after the last answer fails at once, the next
# tick ends the job; 2 poll intervals cover those steps with room. That is the sidecar's own budget;
# the trigger then sees the end at its next poll, and Airflow takes its margin (TRIGGER_SIGHTING).
CRASH_BUDGET = LOST_AFTER + 2 * POLL_INTERVAL + 1.0
# A paused agent must not lose its jobs early: its last answer precedes the SIGSTOP by at most one
# check interval (and a slow tick on a busy machine).
EARLIEST_LOSS = LOST_AFTER - POLL_INTERVAL - 0.5
# A paused agent accepts connections but never answers: each check runs into check_timeout_seconds, so
# the check that decides may start up to a check timeout after it is due and counts once it has timed
# out; a poll interval of room on each, and one more for a busy machine.
PAUSE_LOSS_BUDGET = LOST_AFTER + 2 * (CHECK_TIMEOUT + POLL_INTERVAL) + POLL_INTERVAL
# After SIGCONT the pending health check is answered at once, or the next one is; the next tick sees
# the agent back and sweeps it, which stops the job at once (SIGTERM ends the sleeps).
SWEEP_BUDGET = 2 * POLL_INTERVAL + CHECK_INTERVAL + 0.5


@dataclass
class VmJob:
    """A task's job as it runs on its agent's "VM": its process group and its supervisor."""

    agent_id: str
    task_id: str
    job: dict[str, Any]
    pgid: int
    tree: list[psutil.Process]
    supervisor: psutil.Process


@dataclass
class Stack:
    airflow: AirflowServer
    api: AirflowAPI
    agents: dict[str, AgentProcess]
    sidecar: SidecarProcess
    vm_processes: list[psutil.Process] = field(default_factory=list)  # what teardown makes sure is gone

    def db_job(self, task_id: str) -> dict[str, Any]:
        """The task's job as the router DB has it (a list read: it never waits for an agent)."""
        with self.sidecar.client() as client:
            response = client.get("/jobs", params={"dag_id": DAG_ID, "run_id": RUN_ID})
            response.raise_for_status()
            jobs = [job for job in response.json()["jobs"] if job["task_id"] == task_id]
        assert len(jobs) == 1, jobs
        return dict(jobs[0])

    def ti_state(self, task_id: str) -> str | None:
        state = self.api.task_instance(DAG_ID, RUN_ID, task_id)["state"]
        return str(state) if state is not None else None

    def sidecar_log(self) -> str:
        return self.sidecar.log_path.read_text(encoding="utf-8", errors="replace")

    def diagnostics(self, *agent_ids: str) -> str:
        parts = [f"--- sidecar log (tail) ---\n{self.sidecar_log()[-4000:]}"]
        for agent_id in agent_ids:
            parts.append(f"--- {agent_id} log (tail) ---\n{self.agents[agent_id].log_text()[-2000:]}")
        return "\n".join(parts)


def trigger_log(stack: Stack, task: str) -> str:
    """What the task's trigger logged (Airflow writes it next to the task's own log)."""
    logs = sorted(
        (stack.airflow.home / "logs").glob(f"dag_id={DAG_ID}/run_id={RUN_ID}/task_id={task}/*.trigger.*")
    )
    return "\n".join(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}" for path in logs)


def task_id(agent_id: str) -> str:
    return "on_" + agent_id.replace("-", "_")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("fleet-airflow")
    with ExitStack() as cleanup:  # undone in reverse order
        vm_processes: list[psutil.Process] = []
        cleanup.callback(_kill_leftovers, vm_processes)  # last: once the agents have been stopped
        agents = {}
        for agent_id in AGENTS:
            agent = AgentProcess(home=base / agent_id, agent_id=agent_id, grace_seconds=1.0)
            cleanup.enter_context(agent)
            cleanup.callback(_resume, agent)  # a paused agent could not be stopped: SIGCONT it first
            agents[agent_id] = agent
        sidecar = SidecarProcess(
            workdir=base / "sidecar",
            airflow_url="",  # set once Airflow's port is known
            airflow_password=PASSWORD,
            agents=[AgentRef(a.agent_id, a.url, a.token) for a in agents.values()],
            interval_seconds=POLL_INTERVAL,
            api_version="v2",
            extra_config=FLEET_CONFIG,
        )
        airflow = cleanup.enter_context(
            airflow_with_sidecar(sidecar, home=base / "airflow", dags_folder=DAGS)
        )
        api = airflow.api()
        api.wait_for_dag(DAG_ID)
        api.trigger(DAG_ID, RUN_ID)
        yield Stack(airflow, api, agents, sidecar, vm_processes)


def _resume(agent: AgentProcess) -> None:
    try:
        os.kill(agent.pid, signal.SIGCONT)
    except (RuntimeError, ProcessLookupError):  # never started, or already gone
        pass


def _kill_leftovers(procs: list[psutil.Process]) -> None:
    """Whatever of the jobs' processes outlived their agent (psutil checks each is still the same one)."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def running_job(stack: Stack, agent_id: str) -> VmJob:
    """The deferred task's RUNNING job on ``agent_id``, once its whole process tree has started."""
    task = task_id(agent_id)
    stack.api.wait_for_state(DAG_ID, RUN_ID, task, {"deferred"}, timeout=90)
    job = stack.db_job(task)
    assert (job["agent_id"], job["status"]) == (agent_id, "RUNNING"), job
    agent = stack.agents[agent_id]
    response = httpx.get(
        f"{agent.url}/jobs/{job['job_id']}", headers={"Authorization": f"Bearer {agent.token}"}, timeout=10
    )
    response.raise_for_status()
    pgid = int(response.json()["pid"])  # the job's shell leads its own process group
    wait_until(lambda: len(process_group(pgid)) >= TREE_SIZE, timeout=10, what=f"{task}'s tree started")
    tree = process_group(pgid)
    supervisor = psutil.Process(pgid).parent()
    assert supervisor is not None and supervisor.pid != agent.pid
    assert os.getsid(supervisor.pid) != os.getsid(agent.pid)  # it outlives the agent: another session
    stack.vm_processes += [*tree, supervisor]
    return VmJob(agent_id, task, job, pgid, tree, supervisor)


def assert_untouched(stack: Stack, control: VmJob) -> None:
    """The control's task is deferred, its job RUNNING and every process of its tree alive."""
    assert stack.ti_state(control.task_id) == "deferred"
    assert stack.db_job(control.task_id)["status"] == "RUNNING"
    assert len(alive(control.tree)) == len(control.tree) >= TREE_SIZE


def assert_lost_reason(job: dict[str, Any], agent_id: str) -> datetime:
    """The job ended FAILED because its agent was lost; the time of the agent's last answer."""
    assert job["status"] == "FAILED", job
    prefix = f"agent {agent_id} lost: no answer since "
    assert job["reason"].startswith(prefix), job["reason"]
    since = job["reason"][len(prefix) :].split(" ", 1)[0]
    return datetime.fromisoformat(since)


@dataclass
class Loss:
    """When, after the agent went silent, the router DB ended the job and the task left ``deferred``."""

    job_failed: float | None = None
    ti_left_deferred: float | None = None
    ti_state: str | None = None


def watch_loss(
    stack: Stack, victim: VmJob, control: VmJob, *, since: float, timeout: float, earliest: float = 0.0
) -> Loss:
    """Observe the victim's job and task until the task leaves ``deferred`` (or ``timeout`` seconds
    after ``since``), checking the control all along and that nothing happens before ``earliest``."""
    loss = Loss()
    while time.monotonic() - since <= timeout:
        state = stack.ti_state(victim.task_id)
        now = time.monotonic() - since
        if loss.job_failed is None and stack.db_job(victim.task_id)["status"] != "RUNNING":
            loss.job_failed = now
        if state != "deferred":
            loss.ti_left_deferred, loss.ti_state = now, state
        if loss.job_failed is not None:
            assert loss.job_failed >= earliest, (
                f"job ended {loss.job_failed:.2f} s after the agent went silent"
            )
        if loss.ti_left_deferred is not None:
            assert now >= earliest, f"task left deferred {now:.2f} s after the agent went silent"
            return loss
        assert_untouched(stack, control)
        time.sleep(OBSERVE)
    raise AssertionError(
        f"{victim.task_id} still deferred {timeout:.1f} s after its agent went silent "
        f"(router DB job ended after {loss.job_failed} s)\n{stack.diagnostics(victim.agent_id)}"
    )


def test_crashed_agent_fails_its_task_and_leaves_the_other_agent_alone(stack: Stack) -> None:
    victim = running_job(stack, "agent-a")
    control = running_job(stack, "agent-b")

    # The VM dies: the agent, the job's supervisor and the job's whole process group, all SIGKILLed.
    stack.agents["agent-a"].kill()
    crashed = time.monotonic()
    victim.supervisor.kill()
    os.killpg(victim.pgid, signal.SIGKILL)
    wait_until(
        lambda: not alive([*victim.tree, victim.supervisor]), timeout=5, what="the VM's processes gone"
    )

    # Watched past the budget, so that a miss is measured and shown with the logs.
    loss = watch_loss(stack, victim, control, since=crashed, timeout=CRASH_BUDGET + TRIGGER_SIGHTING + 30)
    print(
        f"\ncrashed agent: router DB job FAILED after {loss.job_failed:.2f} s, task left deferred "
        f"({loss.ti_state}) after {loss.ti_left_deferred:.2f} s; budget {CRASH_BUDGET:.1f} s"
    )
    assert loss.job_failed is not None and loss.job_failed <= CRASH_BUDGET, stack.diagnostics("agent-a")
    assert loss.ti_left_deferred is not None
    assert loss.ti_left_deferred - loss.job_failed <= TRIGGER_SIGHTING, trigger_log(stack, victim.task_id)
    job = stack.db_job(victim.task_id)
    last_answer = assert_lost_reason(job, "agent-a")
    assert (datetime.fromisoformat(job["finished_at"]) - last_answer).total_seconds() >= LOST_AFTER

    final = stack.api.wait_for_state(DAG_ID, RUN_ID, victim.task_id, {"failed", "success"}, timeout=60)
    print(f"crashed agent: task {final['state']} after {time.monotonic() - crashed:.2f} s")
    assert final["state"] == "failed"

    assert_untouched(stack, control)
    assert len(alive(process_group(control.pgid))) >= TREE_SIZE


def test_paused_agent_loses_its_job_only_after_lost_after_and_its_orphan_is_stopped(stack: Stack) -> None:
    victim = running_job(stack, "agent-c")
    control = running_job(stack, "agent-b")
    agent = stack.agents["agent-c"]

    os.kill(agent.pid, signal.SIGSTOP)  # the agent only: its job runs on, as on a VM that hangs
    paused = time.monotonic()
    try:
        loss = watch_loss(
            stack, victim, control, since=paused, timeout=PAUSE_LOSS_BUDGET + 30, earliest=EARLIEST_LOSS
        )
        print(
            f"\npaused agent: router DB job FAILED after {loss.job_failed:.2f} s "
            f"(not before {EARLIEST_LOSS:.1f} s, budget {PAUSE_LOSS_BUDGET:.1f} s), task left deferred "
            f"({loss.ti_state}) after {loss.ti_left_deferred:.2f} s"
        )
        assert loss.job_failed is not None and loss.job_failed <= PAUSE_LOSS_BUDGET, stack.diagnostics()
        assert loss.ti_left_deferred is not None
        job = stack.db_job(victim.task_id)
        last_answer = assert_lost_reason(job, "agent-c")
        assert (datetime.fromisoformat(job["finished_at"]) - last_answer).total_seconds() >= LOST_AFTER
        assert len(alive(victim.tree)) == len(victim.tree)  # the router DB ended it; it still runs
    finally:
        os.kill(agent.pid, signal.SIGCONT)

    def tree_gone() -> bool:
        return not alive(process_group(victim.pgid)) and not alive(victim.tree)

    try:
        gone = wait_until(tree_gone, timeout=SWEEP_BUDGET, what="the orphaned job's tree stopped")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.diagnostics('agent-c')}") from None
    print(f"paused agent: orphan's tree gone {gone:.2f} s after SIGCONT; budget {SWEEP_BUDGET:.1f} s")
    orphan_stops = [
        line
        for line in stack.sidecar_log().splitlines()
        if "stopping orphan: the router DB has ended the job FAILED" in line and victim.job["job_id"] in line
    ]
    assert len(orphan_stops) == 1, orphan_stops
    assert_lost_reason(stack.db_job(victim.task_id), "agent-c")  # the stop changes nothing recorded

    final = stack.api.wait_for_state(DAG_ID, RUN_ID, victim.task_id, {"failed", "success"}, timeout=60)
    print(f"paused agent: task {final['state']} {time.monotonic() - paused:.2f} s after SIGSTOP")
    assert final["state"] == "failed"
    assert_untouched(stack, control)

    # Checked last, so that everything above is still checked when this fails: once the router DB
    # has ended the job, the trigger must see it at its next poll, paused agent or not.
    seen_after = loss.ti_left_deferred - loss.job_failed
    assert seen_after <= TRIGGER_SIGHTING, (
        f"the task left deferred {seen_after:.2f} s after its job ended in the router DB "
        f"(at most {TRIGGER_SIGHTING:.1f} s)\n{trigger_log(stack, victim.task_id)}"
    )
