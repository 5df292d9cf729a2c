"""Races at a job's start and stop: tombstones, late /run requests, lost stop answers, survivors.

Real agent processes where the behaviour lives in the agent; a stand-in agent (a real HTTP server)
only for an answer a real one cannot be made to give on demand (processes surviving SIGKILL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import update

from agent_api.client import AgentClient, AgentRejected
from harness.agent import AgentProcess
from harness.processes import alive, process_group
from harness.served import ServedApp
from harness.wiring import nobody_waits
from reconciler.config import AgentEntry, StopConfig
from reconciler.core.agent_sync import refresh_from_agent
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey
from router_db.models import JobRow


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="t0ken") as proc:
        yield proc


def pool_for(url: str, token: str = "t0ken") -> AgentPool:
    return AgentPool([AgentEntry("agent-1", url)], {"agent-1": token}, timeout=5, stop_timeout=30)


def test_a_stop_before_the_run_leaves_a_tombstone_and_the_late_run_is_refused(agent: AgentProcess) -> None:
    async def scenario() -> None:
        async with AgentClient(agent.url, agent.token) as client:
            stopped = await client.stop("late-job", reason="task instance is failed")
            assert (stopped.ok, stopped.action, stopped.status, stopped.rc) == (
                True,
                "already_finished",
                "FAILED",
                None,
            )
            with pytest.raises(AgentRejected) as refused:
                await client.run("late-job", {"command": "sleep 60"})
            assert refused.value.status == 409
            info = await client.get("late-job")
            assert info.status == "FAILED" and info.pid is None
            assert info.reason == "stopped before it started: task instance is failed"

    asyncio.run(scenario())
    agent.stop()
    agent.start()  # the tombstone is on disk: it outlives the agent

    async def after_restart() -> None:
        async with AgentClient(agent.url, agent.token) as client:
            with pytest.raises(AgentRejected):
                await client.run("late-job", {"command": "sleep 60"})

    asyncio.run(after_restart())


def test_the_agent_lists_its_jobs_by_status(agent: AgentProcess) -> None:
    async def scenario() -> None:
        async with AgentClient(agent.url, agent.token) as client:
            await client.run("list-running", {"command": "sleep 60"})
            await client.run("list-done", {"command": "exit 0"})
            await asyncio.sleep(0.5)
            assert {j.job_id for j in await client.jobs()} == {"list-running", "list-done"}
            assert [j.job_id for j in await client.jobs("RUNNING", "QUEUED")] == ["list-running"]
            await client.stop("list-running")

    asyncio.run(scenario())


def test_a_queued_job_unknown_to_its_agent_is_given_up_only_after_the_start_grace(
    db: RouterDB, agent: AgentProcess
) -> None:
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-1", "sleep 60"))

    async def scenario() -> None:
        pool = pool_for(agent.url)
        try:
            # Its /run is in flight (or was, and is stuck on the way): a 404 proves nothing yet.
            fresh = await refresh_from_agent(db, pool, job)
            assert fresh.status is JobStatus.QUEUED
            with db.engine.begin() as conn:  # the submission is now long past
                past = datetime.now(UTC) - timedelta(minutes=5)
                conn.execute(update(JobRow).where(JobRow.job_id == job.job_id).values(created_at=past))
            old = db.get(job.job_id)
            assert old is not None
            given_up = await refresh_from_agent(db, pool, old)
            assert given_up.status is JobStatus.FAILED and given_up.reason == "agent never started the job"
            # The /run arriving even later finds the tombstone.
            with pytest.raises(AgentRejected):
                await pool.client("agent-1").run(job.job_id, {"command": "sleep 60"})
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_retried_stop_keeps_the_status_chosen_at_intent(db: RouterDB, agent: AgentProcess) -> None:
    # The task was marked success; the first stop killed the job but its answer was lost. The retry
    # finds the job ended (FAILED, by SIGTERM): the router DB records Airflow's verdict, rc the truth.
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-1", "sleep 60"))

    async def scenario() -> None:
        pool = pool_for(agent.url)
        try:
            await pool.client("agent-1").run(job.job_id, {"command": "sleep 60"})
            db.mark_running(job.job_id, source="submit")
            stopping = db.request_stop(
                job.job_id, stop_status=JobStatus.SUCCEEDED, reason="task instance marked success", source="t"
            )
            await pool.client("agent-1").stop(
                job.job_id, reason="task instance marked success"
            )  # answer lost
            dispatcher = StopDispatcher(
                db, pool, Metrics(), StopConfig(attempts=1), changed=nobody_waits
            )
            dispatcher.resume(stopping)
            await dispatcher.finish(30)
        finally:
            await pool.close()

    asyncio.run(scenario())
    done = db.get(job.job_id)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.rc == -15


@pytest.mark.fast
def test_a_stop_whose_processes_survive_stays_stopping_and_is_retried_with_force(db: RouterDB) -> None:
    calls: list[dict[str, Any]] = []

    async def stop(request: web.Request) -> web.Response:
        calls.append(await request.json())
        survived = len(calls) == 1
        return web.json_response(
            {
                "ok": not survived,
                "message": "processes 4242 are still alive after SIGKILL" if survived else "killed",
                "status": "RUNNING" if survived else "FAILED",
                "rc": None if survived else -9,
                "action": "killed",
                "signal": "SIGKILL",
                "reason": "task instance is failed",
            }
        )

    app = web.Application()
    app.router.add_post("/stop/{job_id}", stop)
    served = ServedApp(app)
    served.start()
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-1", "sleep 60"))
    db.mark_running(job.job_id, source="submit")
    stopping = db.request_stop(
        job.job_id, stop_status=JobStatus.FAILED, reason="task instance is failed", source="t"
    )

    async def scenario() -> list[JobStatus]:
        pool = pool_for(served.url)
        seen = []
        try:
            dispatcher = StopDispatcher(
                db, pool, Metrics(), StopConfig(attempts=1), changed=nobody_waits
            )
            for _ in range(2):  # two cycles resume the pending stop
                dispatcher.resume(stopping)
                await dispatcher.finish(10)
                record = db.get(job.job_id)
                assert record is not None
                seen.append(record.status)
        finally:
            await pool.close()
        return seen

    try:
        assert asyncio.run(scenario()) == [JobStatus.STOPPING, JobStatus.FAILED]
    finally:
        served.stop()
    assert [c["force"] for c in calls] == [False, True]
    assert db.get(job.job_id).rc == -9  # type: ignore[union-attr]


def test_a_stop_of_a_running_job_still_kills_its_tree(db: RouterDB, agent: AgentProcess) -> None:
    """The tombstone path must not shadow the ordinary one."""

    async def scenario() -> int:
        async with AgentClient(agent.url, agent.token) as client:
            info = await client.run("real-job", {"command": "sleep 60 & sleep 60; wait"})
            assert info.pid is not None
            await asyncio.sleep(0.3)
            result = await client.stop("real-job")
            assert result.action in ("terminated", "killed")
            return info.pid

    group = asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while alive(process_group(group)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(process_group(group))
