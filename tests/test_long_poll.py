"""``GET /jobs/{id}?wait=N``: a long-poll that answers as soon as the job changes.

In process first (the job service, its watch and a real router DB on SQLite and PostgreSQL): a change
this process records wakes the waiters at once, one written by another writer of the same router DB
within the watch's period, and a wait that runs out answers with the job unchanged. Then a real
sidecar process: a job read never reaches its agent, a long-poll hears of a change another process
writes to the sidecar's router DB, and bad values of ``wait`` and ``status`` are refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from agent_api.protocol import AgentJobStatus, JobInfo
from harness.processes import free_port, wait_until
from harness.scripted import ScriptedAirflow
from harness.served import ServedAirflow, ServedApp
from harness.sidecar import AgentRef, SidecarProcess
from harness.wiring import nobody_waits
from reconciler.config import AgentEntry, PollConfig, StopConfig
from reconciler.core.job_service import JobService
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.core.watch import JobWatch
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey
from sidecar_api.protocol import WireError, parse_wait


def running_job(db: RouterDB, task_id: str = "t", agent_id: str = "agent-1") -> JobRecord:
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id=task_id, run_id="r"), agent_id, "sleep 60"))
    return db.mark_running(job.job_id, source="test")


def exited(job_id: str, rc: int) -> JobInfo:
    now = datetime.now(UTC)
    status = AgentJobStatus.SUCCEEDED if rc == 0 else AgentJobStatus.FAILED
    return JobInfo(job_id, status, 1, rc, now, now, None)


def service(db: RouterDB, *, watch_seconds: float) -> tuple[JobService, AgentPool]:
    agents = AgentPool(
        [AgentEntry("agent-1", f"http://127.0.0.1:{free_port()}")],
        {"agent-1": "t"},
        timeout=1,
        stop_timeout=1,
    )
    metrics = Metrics()
    dispatcher = StopDispatcher(db, agents, metrics, StopConfig(), changed=nobody_waits)
    core = build_core(
        db=db,
        airflow=ScriptedAirflow(truth={}),
        agents=agents,
        dispatcher=dispatcher,
        metrics=metrics,
        poll=PollConfig(watch_seconds=watch_seconds),
    )
    jobs = JobService(
        db=db,
        agents=agents,
        fleet=None,
        confirmer=core.confirmer,
        sync=core.sync,
        watch=core.watch,
        dispatcher=dispatcher,
    )
    return jobs, agents


@pytest.mark.fast
@pytest.mark.parametrize("text", ["0", "30", "60", "2.5", "0.000001", "60.000000", "1e1", "-0", "1.1234567"])
def test_wait_takes_seconds_up_to_a_minute(text: str) -> None:
    assert parse_wait(text) == float(text)


@pytest.mark.fast
@pytest.mark.parametrize(
    "text", ["", "-1", "60.5", "61", "1e3", "nan", "inf", " 5", "5s", "0x10", "1e999", ".5", "5."]
)
def test_wait_refuses_anything_else(text: str) -> None:
    with pytest.raises(WireError, match="wait must be"):
        parse_wait(text)


def test_a_change_recorded_here_answers_every_waiter_at_once(router_db: RouterDB) -> None:
    job = running_job(router_db)

    async def scenario() -> tuple[list[JobRecord], float, int]:
        jobs, agents = service(router_db, watch_seconds=30.0)  # the periodic read cannot be what answers
        try:
            waiters = [asyncio.create_task(jobs.job(job.job_id, wait=20)) for _ in range(200)]
            await asyncio.sleep(0.3)
            watched = jobs._watch.watched
            changed_at = time.monotonic()
            assert await jobs.apply_agent_reports("agent-1", [exited(job.job_id, 3)]) == 1
            answers = await asyncio.gather(*waiters)
            return answers, time.monotonic() - changed_at, watched
        finally:
            await agents.close()

    answers, took, watched = asyncio.run(scenario())
    assert watched == 1  # 200 requests wait on one future
    # The write and the wake-up take milliseconds; the bound is far below the waits' 20 s and the
    # periodic read's 30 s, and leaves room for a busy machine's scheduling.
    assert took < 2.0
    assert {(a.status, a.rc) for a in answers} == {(JobStatus.FAILED, 3)}


def test_a_change_written_by_another_process_is_seen_within_the_watch_period(router_db: RouterDB) -> None:
    job = running_job(router_db)
    other = RouterDB(router_db.engine.url.render_as_string(hide_password=False))  # another writer's engine

    async def scenario() -> tuple[JobRecord, float]:
        jobs, agents = service(router_db, watch_seconds=0.2)
        try:
            waiter = asyncio.create_task(jobs.job(job.job_id, wait=20, known=JobStatus.RUNNING))
            await asyncio.sleep(0.3)
            changed_at = time.monotonic()
            await asyncio.to_thread(
                other.finish, job.job_id, status=JobStatus.SUCCEEDED, rc=0, reason="done", source="test"
            )
            answer = await waiter
            return answer, time.monotonic() - changed_at
        finally:
            await agents.close()

    try:
        answer, took = asyncio.run(scenario())
    finally:
        other.dispose()
    assert answer.status is JobStatus.SUCCEEDED
    assert took < 0.6


def test_a_wait_that_runs_out_answers_with_the_job_unchanged(router_db: RouterDB) -> None:
    job = running_job(router_db)

    async def scenario() -> tuple[JobRecord, float, int]:
        jobs, agents = service(router_db, watch_seconds=0.1)
        try:
            started = time.monotonic()
            answer = await jobs.job(job.job_id, wait=0.6)
            return answer, time.monotonic() - started, jobs._watch.watched
        finally:
            await agents.close()

    answer, took, watched = asyncio.run(scenario())
    assert answer == job
    assert 0.55 <= took < 1.5
    assert watched == 0  # nobody waits any more: the periodic read has stopped


def test_a_status_other_than_the_one_named_answers_at_once(router_db: RouterDB) -> None:
    job = running_job(router_db)
    done = router_db.finish(job.job_id, status=JobStatus.FAILED, rc=1, reason="x", source="test")

    async def scenario() -> list[float]:
        jobs, agents = service(router_db, watch_seconds=10)
        took = []
        try:
            for known in (JobStatus.RUNNING, JobStatus.FAILED, None):  # differs; ended; ended
                started = time.monotonic()
                assert await jobs.job(job.job_id, wait=30, known=known) == done
                took.append(time.monotonic() - started)
        finally:
            await agents.close()
        return took

    assert max(asyncio.run(scenario())) < 0.5


@pytest.mark.fast
def test_closing_the_watch_answers_every_waiter_with_what_it_has(db: RouterDB) -> None:
    job = running_job(db)

    async def scenario() -> tuple[list[JobRecord], float, JobRecord]:
        watch = JobWatch(db, period=10)
        waiters = [asyncio.create_task(watch.wait(job, lambda j: not j.active, 30)) for _ in range(50)]
        await asyncio.sleep(0.1)
        closed_at = time.monotonic()
        watch.close()
        answers = await asyncio.gather(*waiters)
        late = await watch.wait(job, lambda j: not j.active, 30)  # after the close: at once
        return answers, time.monotonic() - closed_at, late

    answers, took, late = asyncio.run(scenario())
    assert answers == [job] * 50 and late == job
    assert took < 0.2


@pytest.mark.fast
def test_an_older_record_never_replaces_a_newer_one(db: RouterDB) -> None:
    job = running_job(db)
    done = db.finish(job.job_id, status=JobStatus.FAILED, rc=1, reason="x", source="test")

    async def scenario() -> JobRecord:
        watch = JobWatch(db, period=10)
        waiter = asyncio.create_task(watch.wait(job, lambda j: j.status is JobStatus.SUCCEEDED, 0.3))
        await asyncio.sleep(0.05)
        assert watch.notify([done]) == 1
        assert watch.notify([job]) == 0  # a read that began before the change, come back late
        return await waiter

    assert asyncio.run(scenario()) == done  # timed out on the newest record it saw


# --- a real sidecar process ---------------------------------------------------------------------------


class CountingAgent:
    """An agent stand-in that answers every job RUNNING and counts every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def any(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path_qs}")
        if request.path == "/health":
            return web.json_response({"status": "ok", "agent_id": "agent-1", "jobs_running": 1})
        job_id = request.path.rsplit("/", 1)[-1]
        return web.json_response(
            {
                "job_id": job_id,
                "status": "RUNNING",
                "pid": 1,
                "rc": None,
                "started_at": None,
                "finished_at": None,
                "reason": None,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        return app


@pytest.fixture
def stand(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[SidecarProcess, CountingAgent, RouterDB]]:
    backend = request.param
    url = (
        f"sqlite:///{tmp_path / 'router.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    db = RouterDB(url)
    db.create_schema()
    agent = CountingAgent()
    served = ServedApp(agent.app())
    airflow = ServedAirflow()
    served.start()
    airflow.start()
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="stand-in",
        agents=[AgentRef("agent-1", served.url, "agent-token")],
        api_version="v2",
        db_url=url,
        # No cycle within the test: only the long-poll's own read can see the change.
        interval_seconds=3600,
    )
    try:
        with sidecar:
            yield sidecar, agent, db
    finally:
        airflow.stop()
        served.stop()
        db.dispose()


def first_cycle_done(client: httpx.Client) -> bool:
    metrics = client.get("/metrics").text
    return any(
        line.startswith("reconciler_cycles_total{") and float(line.rsplit(" ", 1)[1]) >= 1
        for line in metrics.splitlines()
    )


@pytest.mark.parametrize("stand", ["sqlite", "postgresql"], indirect=True)
def test_the_sidecar_answers_job_reads_without_asking_the_agent_and_long_polls_for_a_change(
    stand: tuple[SidecarProcess, CountingAgent, RouterDB],
) -> None:
    sidecar, agent, db = stand
    with sidecar.client() as client:
        # The job is made once the first cycle has run (the lease may be taken a moment after the
        # sidecar answers): a cycle would find no task instance for it in Airflow and stop it.
        wait_until(lambda: first_cycle_done(client), timeout=30, what="the first cycle")
    job = running_job(db)
    with sidecar.client() as client:
        time.sleep(0.5)  # the first cycle's catch-up and sweep are over
        before = list(agent.requests)
        for _ in range(20):
            answer = client.get(f"/jobs/{job.job_id}")
            assert answer.status_code == 200 and answer.json()["status"] == "RUNNING"
        started = time.monotonic()
        timed_out = client.get(f"/jobs/{job.job_id}", params={"wait": "0.8"})
        assert timed_out.status_code == 200 and timed_out.json()["status"] == "RUNNING"
        assert 0.75 <= time.monotonic() - started < 3
        assert not [r for r in agent.requests[len(before) :] if "/jobs/" in r]  # health checks only

        # Another process (this test) records the exit in the sidecar's router DB.
        def finish_soon() -> float:
            time.sleep(1.0)
            db.finish(job.job_id, status=JobStatus.FAILED, rc=7, reason="exited", source="test")
            return time.monotonic()

        with ThreadPoolExecutor(1) as pool:  # the sidecar's client waits up to 30 s
            changed = pool.submit(finish_soon)
            answer = client.get(f"/jobs/{job.job_id}", params={"wait": "20", "status": "RUNNING"})
            answered_at = time.monotonic()
            changed_at = changed.result()
        assert answer.status_code == 200
        assert (answer.json()["status"], answer.json()["rc"]) == ("FAILED", 7)
        assert answered_at - changed_at < 1.0  # the watch reads every 0.5 s

        for params in ({"wait": "61"}, {"wait": "-1"}, {"wait": "soon"}, {"wait": "5", "status": "DONE"}):
            refused = client.get(f"/jobs/{job.job_id}", params=params)
            assert refused.status_code == 400, params
            assert "wait" in refused.json()["error"] or "status" in refused.json()["error"]
        assert client.get(f"/jobs/{'0' * 32}", params={"wait": "5"}).status_code == 404
