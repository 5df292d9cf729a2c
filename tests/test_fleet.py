"""Agent liveness, lost agents and the orphan sweep, against real agent processes.

Agents are SIGKILLed (a VM that dies with its jobs) and SIGSTOPped (a VM that hangs, then comes back)
for real; Airflow's answers are scripted (the loop's Airflow side is not under test here, and an
unreachable Airflow must not matter to any of this).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.agent import AgentProcess
from harness.processes import alive, free_port, process_group
from harness.scripted import ScriptedAirflow, ti
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from harness.wiring import nobody_waits
from reconciler.config import AgentEntry, FleetConfig, PollConfig, StopConfig
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.agent_state import AgentState, agent_state, partitioned
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.liveness import Fleet
from reconciler.fleet.orphans import orphans
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey

FLEET = FleetConfig(
    lost_after_seconds=2.0, check_interval_seconds=0.2, check_timeout_seconds=1.0, orphan_sweep_seconds=30.0
)


@pytest.fixture
def two_agents(tmp_path: Path) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    with (
        AgentProcess(tmp_path / "a", agent_id="agent-a", token="token-a") as a,
        AgentProcess(tmp_path / "b", agent_id="agent-b", token="token-b") as b,
    ):
        try:
            yield a, b
        finally:
            for agent in (a, b):  # a paused agent cannot even be terminated
                if agent._proc is not None and agent._proc.poll() is None:
                    os.kill(agent.pid, signal.SIGCONT)


def pool_of(*agents: AgentProcess) -> AgentPool:
    return AgentPool(
        [AgentEntry(a.agent_id, a.url) for a in agents],
        {a.agent_id: a.token for a in agents},
        timeout=5,
        stop_timeout=30,
    )


class Sidecar:
    """The loop with its fleet, as the service wires them; each step ticks the fleet, then cycles."""

    def __init__(self, db: RouterDB, pool: AgentPool, airflow: ScriptedAirflow, fleet: FleetConfig) -> None:
        self.metrics = Metrics()
        self.fleet = Fleet(db=db, agents=pool, metrics=self.metrics, config=fleet, changed=nobody_waits)
        self.loop = build_core(
            db=db,
            airflow=airflow,
            agents=pool,
            dispatcher=StopDispatcher(
                db, pool, self.metrics, StopConfig(attempts=1), changed=nobody_waits
            ),
            metrics=self.metrics,
            poll=PollConfig(interval_seconds=0.2, full_resync_seconds=3600.0, agent_sync_per_cycle=50),
            fleet=self.fleet,
        ).loop

    async def cycle_until(self, predicate: Callable[[], bool], timeout: float) -> float:
        """Cycle until ``predicate`` holds; returns how long it took (fails the test on timeout)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            await self.fleet.tick()
            await self.loop.cycle()
            if predicate():
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        raise AssertionError(f"not within {timeout} s")

    async def cycle_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.fleet.tick()
            await self.loop.cycle()
            await asyncio.sleep(0.2)


async def start_job(db: RouterDB, pool: AgentPool, agent: AgentProcess, task_id: str) -> JobRecord:
    job, _ = db.submit(
        NewJob(TaskInstanceKey(dag_id="d", task_id=task_id, run_id="r"), agent.agent_id, "sleep 120")
    )
    await pool.client(agent.agent_id).run(job.job_id, {"command": "sleep 120"})
    return db.mark_running(job.job_id, source="test")


async def pgid_of(pool: AgentPool, job: JobRecord) -> int:
    info = await pool.client(job.agent_id).get(job.job_id)
    assert info.pid is not None
    return info.pid  # the job's shell leads its own process group


def status(db: RouterDB, job: JobRecord) -> JobStatus:
    record = db.get(job.job_id)
    assert record is not None
    return record.status


def deferred(*jobs: JobRecord) -> ScriptedAirflow:
    """Airflow wants every job: nothing here may be stopped because of Airflow."""
    return ScriptedAirflow(truth={("d", "r", j.key.task_id, -1): ti(j, "deferred") for j in jobs})


def test_a_killed_agent_is_lost_and_only_its_jobs_end_failed(
    db: RouterDB, two_agents: tuple[AgentProcess, AgentProcess]
) -> None:
    a, b = two_agents
    pool = pool_of(a, b)

    async def scenario() -> float:
        try:
            on_a, on_b = await start_job(db, pool, a, "on-a"), await start_job(db, pool, b, "on-b")
            group_a = await pgid_of(pool, on_a)
            sidecar = Sidecar(db, pool, deferred(on_a, on_b), FLEET)
            await sidecar.cycle_for(0.5)
            a.kill()  # the VM dies with its job
            os.killpg(group_a, signal.SIGKILL)
            took = await sidecar.cycle_until(lambda: status(db, on_a) is JobStatus.FAILED, timeout=10)
            assert status(db, on_b) is JobStatus.RUNNING
            assert sidecar.fleet.states() == {"agent-a": AgentState.LOST, "agent-b": AgentState.LIVE}
            # New work routed by labels goes to the agent that answers.
            assert {pool.route(agent_id=None, labels=[]) for _ in range(4)} == {"agent-b"}
            await sidecar.fleet.close()
            return took
        finally:
            await pool.close()

    took = asyncio.run(scenario())
    assert took <= FLEET.lost_after_seconds + 2 * FLEET.check_interval_seconds + 1.0
    record = db.get(next(j for j in db.search() if j.key.task_id == "on-a").job_id)
    assert record is not None and record.rc is None
    assert record.reason is not None and record.reason.startswith("agent agent-a lost: no answer since 20")


def test_a_paused_agent_is_lost_and_its_job_is_stopped_as_an_orphan_when_it_answers_again(
    db: RouterDB, two_agents: tuple[AgentProcess, AgentProcess]
) -> None:
    a, b = two_agents
    pool = pool_of(a, b)

    async def scenario() -> tuple[list[int], float]:
        try:
            job = await start_job(db, pool, a, "paused")
            other = await start_job(db, pool, b, "other")
            group = await pgid_of(pool, job)
            sidecar = Sidecar(db, pool, deferred(job, other), FLEET)
            await sidecar.cycle_for(0.5)
            os.kill(a.pid, signal.SIGSTOP)
            await sidecar.cycle_until(lambda: status(db, job) is JobStatus.FAILED, timeout=10)
            running_while_lost = [p.pid for p in alive(process_group(group))]
            os.kill(a.pid, signal.SIGCONT)
            took = await sidecar.cycle_until(lambda: not alive(process_group(group)), timeout=10)
            assert status(db, other) is JobStatus.RUNNING
            assert sidecar.metrics.orphans_stopped._value.get() == 1
            await sidecar.fleet.close()
            return running_while_lost, took
        finally:
            await pool.close()

    running_while_lost, took = asyncio.run(scenario())
    assert running_while_lost, "the job must have kept running on the paused VM"
    assert took <= 2.0


def test_a_slow_agent_that_answers_within_lost_after_never_loses_a_job(
    db: RouterDB, two_agents: tuple[AgentProcess, AgentProcess]
) -> None:
    a, _ = two_agents
    pool = pool_of(a)

    async def scenario() -> None:
        try:
            job = await start_job(db, pool, a, "slow")
            sidecar = Sidecar(db, pool, deferred(job), FLEET)
            await sidecar.cycle_for(0.5)
            for _ in range(2):  # two hangs, each shorter than lost_after_seconds
                os.kill(a.pid, signal.SIGSTOP)
                await sidecar.cycle_for(FLEET.lost_after_seconds * 0.6)
                os.kill(a.pid, signal.SIGCONT)
                await sidecar.cycle_for(0.6)
            assert status(db, job) is JobStatus.RUNNING
            assert sidecar.fleet.states() == {"agent-a": AgentState.LIVE}
            await sidecar.fleet.close()
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_exits_are_recorded_while_airflow_is_unreachable(db: RouterDB, tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent", agent_id="agent-a", token="token-a") as agent:
        pool = pool_of(agent)

        async def scenario() -> None:
            try:
                job, _ = db.submit(
                    NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-a", "exit 3")
                )
                await pool.client("agent-a").run(job.job_id, {"command": "exit 3"})
                db.mark_running(job.job_id, source="test")
                airflow = ScriptedAirflow(fail_lists=True, fail_direct=True)
                sidecar = Sidecar(db, pool, airflow, FLEET)
                await sidecar.cycle_until(lambda: status(db, job) is JobStatus.FAILED, timeout=5)
                assert sidecar.metrics.cycles.labels("airflow_error")._value.get() >= 1
                await sidecar.fleet.close()
            finally:
                await pool.close()

        asyncio.run(scenario())
    (record,) = db.search()
    assert record.rc == 3


@pytest.mark.fast
def test_an_agent_is_lost_only_by_a_check_sent_after_the_whole_silence() -> None:
    # The sidecar itself was paused for 200 s: the check in flight then "fails", but it was sent long
    # before; only a check sent lost_after seconds after the last answer may declare the agent lost.
    assert (
        agent_state(last_contact=0, last_check_ok=False, failed_check_started=1, lost_after=120) == "suspect"
    )
    assert (
        agent_state(last_contact=0, last_check_ok=False, failed_check_started=120, lost_after=120) == "lost"
    )
    assert (
        agent_state(last_contact=0, last_check_ok=True, failed_check_started=None, lost_after=120) == "live"
    )


@pytest.mark.fast
def test_an_orphan_is_a_running_job_the_router_db_has_ended(db: RouterDB) -> None:
    from agent_api.protocol import AgentJobStatus, JobInfo

    ended, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="ended", run_id="r"), "agent-a", "x"))
    db.finish(ended.job_id, status=JobStatus.FAILED, rc=None, reason="lost", source="test")
    active, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="active", run_id="r"), "agent-a", "x"))

    def info(job_id: str) -> JobInfo:
        return JobInfo(job_id, AgentJobStatus.RUNNING, 1, None, None, None, None)

    running = [info(ended.job_id), info(active.job_id), info("stranger")]
    found = orphans(running, db.get_many([i.job_id for i in running]))
    # A job the router DB never heard of is left alone: another sidecar may share the agent.
    assert [job_id for job_id, _ in found] == [ended.job_id]


def test_the_sidecar_answers_at_once_for_a_lost_agent_and_gives_it_no_new_work(tmp_path: Path) -> None:
    """Real processes: the trigger's poll and log reads do not wait on a dead VM, and a submission
    pinned to it is answered 503 with Retry-After (the operator retries) instead of a doomed job."""
    airflow = ServedAirflow()
    airflow.standin.add("d", "r", "t", -1, state="running", try_number=1)
    airflow.start()
    with AgentProcess(tmp_path / "a", agent_id="agent-a", token="token-a") as agent:
        sidecar = SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[AgentRef("agent-a", agent.url, agent.token)],
            api_version="v2",
            interval_seconds=0.5,
            extra_config=(
                "[leader]\nlease_seconds = 5.0\n"  # below lost_after_seconds, as it must be
                "[fleet]\nlost_after_seconds = 6.0\ncheck_interval_seconds = 0.2\n"
                "check_timeout_seconds = 1.0\n"
            ),
        )
        try:
            sidecar.start()
            with sidecar.client() as client:
                body = {"command": "sleep 120", "agent_id": "agent-a", "dag_id": "d", "task_id": "t"}
                job = client.post("/jobs", json={**body, "run_id": "r", "try_number": 1}).json()
                os.kill(agent.pid, signal.SIGSTOP)  # hung VM: connections accepted, never answered
                deadline = time.monotonic() + 15
                while client.get(f"/jobs/{job['job_id']}").json()["status"] != "FAILED":
                    assert time.monotonic() < deadline, "the lost agent's job did not end"
                    time.sleep(0.2)
                started = time.monotonic()
                assert client.get(f"/jobs/{job['job_id']}").json()["reason"].startswith("agent agent-a lost")
                log = client.get(f"/jobs/{job['job_id']}/log")
                took = time.monotonic() - started
                assert log.status_code == 502 and "agent-a is lost" in log.json()["error"]
                assert took < 1.0, f"the API waited {took:.1f} s on a lost agent"
                refused = client.post("/jobs", json={**body, "run_id": "r2", "try_number": 1})
                assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
                assert "agent-a is lost" in refused.json()["error"]
                assert client.get("/readyz").json()["warnings"] == ["agents lost: agent-a"]
        finally:
            os.kill(agent.pid, signal.SIGCONT)
            sidecar.stop()
            airflow.stop()


@pytest.mark.fast
def test_most_agents_failing_at_once_is_taken_for_the_sidecars_own_outage(db: RouterDB) -> None:
    # Three agents nobody can reach (the sidecar's DNS or network policy broke): nobody is lost.
    entries = [AgentEntry(f"agent-{i}", f"http://127.0.0.1:{free_port()}") for i in range(3)]
    pool = AgentPool(entries, {e.id: "t" for e in entries}, timeout=1, stop_timeout=1)
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-0", "sleep 1"))

    async def scenario() -> dict[str, AgentState]:
        try:
            fleet = Fleet(db=db, agents=pool, metrics=Metrics(), config=FLEET, changed=nobody_waits)
            deadline = time.monotonic() + FLEET.lost_after_seconds + 2.0
            while time.monotonic() < deadline:
                await fleet.tick()
                await asyncio.sleep(0.1)
            states = fleet.states()
            await fleet.close()
            return states
        finally:
            await pool.close()

    assert set(asyncio.run(scenario()).values()) == {AgentState.SUSPECT}
    assert status(db, job) is JobStatus.QUEUED
    assert partitioned(failing=1, total=3) is False and partitioned(failing=1, total=1) is False
