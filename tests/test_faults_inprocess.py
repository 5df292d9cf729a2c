"""Faults the dispatcher and the loop must absorb: agents that answer 500 or hang, a locked SQLite.

The dispatcher and the loop run in this process against real servers on loopback: a real agent, and
tiny aiohttp servers for the broken agents. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import event

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.wiring import nobody_waits
from reconciler.airflow.task_instances import TaskInstance
from reconciler.config import AgentEntry, PollConfig, StopConfig
from reconciler.core.decision import Divergence, Stop
from reconciler.core.loop import ReconcileLoop
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey

FAILED = Stop(Divergence.TI_FAILED, JobStatus.FAILED, "task instance is failed")


def running_job(db: RouterDB, task_id: str, agent_id: str) -> JobRecord:
    job, _ = db.submit(
        NewJob(
            TaskInstanceKey(dag_id="d", task_id=task_id, run_id="r", map_index=-1, try_number=1),
            agent_id,
            "sleep 60",
        )
    )
    return db.mark_running(job.job_id, source="test")


async def serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/stop/{job_id}", handler)
    # A short shutdown: cleanup() must not wait an hour for the hanging handler.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def hang(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)  # never answers; the client's timeout must end the call
    raise AssertionError("unreachable")


async def broken(request: web.Request) -> web.Response:
    return web.json_response({"detail": "internal error"}, status=500)


def test_agents_answering_500_or_hanging_are_bounded_and_never_block_a_healthy_agents_stop(
    tmp_path: Path, db: RouterDB
) -> None:
    with AgentProcess(tmp_path / "agent", agent_id="healthy", token="a-token") as agent:

        async def scenario() -> None:
            hang_runner, hang_url = await serve(hang)
            broken_runner, broken_url = await serve(broken)
            entries = [
                AgentEntry(id="hang", url=hang_url),
                AgentEntry(id="broken", url=broken_url),
                AgentEntry(id="healthy", url=agent.url),
            ]
            stop_timeout = 1.0
            pool = AgentPool(
                entries, {e.id: agent.token for e in entries}, timeout=stop_timeout, stop_timeout=stop_timeout
            )
            # Few slots in all: four stops on the hanging agent could take them all, but each agent
            # gets at most two.
            config = StopConfig(
                attempts=3,
                backoff_initial_seconds=0.1,
                backoff_max_seconds=0.5,
                timeout_seconds=stop_timeout,
                concurrency=4,
                per_agent_concurrency=2,
            )
            metrics = Metrics()
            dispatcher = StopDispatcher(db, pool, metrics, config, changed=nobody_waits)
            try:
                hanging = [running_job(db, f"hang{i}", "hang") for i in range(4)]
                failing = running_job(db, "broken", "broken")
                healthy = running_job(db, "healthy", "healthy")
                async with httpx.AsyncClient() as client:
                    answer = await client.post(
                        f"{agent.url}/run",
                        json={"job_id": healthy.job_id, "payload": {"command": "sleep 60"}},
                        headers={"Authorization": f"Bearer {agent.token}"},
                    )
                    assert answer.status_code in (200, 201), answer.text
                started = time.monotonic()
                await dispatcher.stop_many(
                    [(job, FAILED) for job in [*hanging, failing, healthy]], source="test"
                )
                while db.get(healthy.job_id).status is not JobStatus.FAILED:  # type: ignore[union-attr]
                    assert time.monotonic() - started < 5, "the healthy agent's stop waited on the others"
                    await asyncio.sleep(0.05)
                assert all(db.get(j.job_id).status is JobStatus.STOPPING for j in hanging)  # type: ignore[union-attr]

                # Bounded: 3 attempts of at most 1 s plus backoff per stop, two stops at a time.
                await asyncio.wait_for(dispatcher.finish(60), timeout=20)
                assert dispatcher.inflight == 0
                took = time.monotonic() - started
                assert took < 12, took
                for job in [*hanging, failing]:  # left STOPPING: the next cycle resumes them
                    assert db.get(job.job_id).status is JobStatus.STOPPING  # type: ignore[union-attr]
                assert metrics.stop_requests.labels("retry")._value.get() == 5
                assert metrics.stop_requests.labels("stopped")._value.get() == 1
            finally:
                await dispatcher.finish(5)
                await pool.close()
                await hang_runner.cleanup()
                await broken_runner.cleanup()

        asyncio.run(scenario())


class FailedAirflow:
    """Every task instance reads as failed."""

    def __init__(self, jobs: Iterable[JobRecord]) -> None:
        self._tis = [
            TaskInstance(j.key.dag_id, j.key.run_id, j.key.task_id, j.key.map_index, "failed", 1, None)
            for j in jobs
        ]

    async def changed_since(self, since: Any) -> list[TaskInstance]:
        return list(self._tis)

    async def task_instance_pages(self, **_: Any) -> AsyncIterator[list[TaskInstance]]:
        yield list(self._tis)

    async def count_task_instances(self, **_: Any) -> int:
        return 0  # none deferred

    async def get_task_instance(
        self, *, dag_id: str, run_id: str, task_id: str, map_index: int
    ) -> TaskInstance:
        return next(ti for ti in self._tis if ti.key == (dag_id, run_id, task_id, map_index))

    async def ping(self) -> None:
        return None


def hold_write_lock(path: Path, seconds: float, held: threading.Event) -> threading.Thread:
    """Another connection takes SQLite's write lock and keeps it for ``seconds``."""

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(timeout=5)
    return thread


def loop_on(db: RouterDB, jobs: list[JobRecord]) -> tuple[ReconcileLoop, StopDispatcher, AgentPool]:
    pool = AgentPool(
        [AgentEntry(id="agent-1", url=f"http://127.0.0.1:{free_port()}")],  # unreachable: stops stay STOPPING
        {"agent-1": "t"},
        timeout=1.0,
        stop_timeout=1.0,
    )
    metrics = Metrics()
    dispatcher = StopDispatcher(db, pool, metrics, StopConfig(attempts=1), changed=nobody_waits)
    loop = build_core(
        db=db,
        airflow=FailedAirflow(jobs),
        agents=pool,
        dispatcher=dispatcher,
        metrics=metrics,
        poll=PollConfig(agent_sync_per_cycle=0),
    ).loop
    return loop, dispatcher, pool


@pytest.mark.parametrize(
    ("busy_timeout_ms", "lock_seconds", "first_result"),
    [(10_000, 2.0, "ok"), (300, 2.0, "db_error")],
    ids=["waits-for-the-lock", "reports-db-error"],
)
@pytest.mark.fast
def test_a_locked_sqlite_router_db_makes_the_cycle_wait_or_report_db_error_and_it_recovers(
    tmp_path: Path, busy_timeout_ms: int, lock_seconds: float, first_result: str
) -> None:
    path = tmp_path / "router.db"
    db = RouterDB(f"sqlite:///{path}")
    # After the router DB's own pragmas: how long a writer waits for the lock before it fails.
    event.listen(db.engine, "connect", lambda conn, _: conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}"))
    db.create_schema()
    job = running_job(db, "t", "agent-1")

    async def scenario() -> tuple[str, float, str]:
        loop, dispatcher, pool = loop_on(db, [job])
        try:
            held = threading.Event()
            holder = await asyncio.to_thread(hold_write_lock, path, lock_seconds, held)
            started = time.monotonic()
            first = await loop.cycle()  # reads work under WAL; recording the stop intent meets the lock
            took = time.monotonic() - started
            await asyncio.to_thread(holder.join, 10)
            second = await loop.cycle()
            await dispatcher.finish(5)
            return first.result, took, second.result
        finally:
            await dispatcher.finish(5)
            await pool.close()

    try:
        first, took, second = asyncio.run(scenario())
        assert first == first_result
        if first_result == "ok":
            assert took >= lock_seconds * 0.8  # it waited for the lock rather than failing
        else:
            assert took < lock_seconds  # it gave up after the busy timeout, without crashing
        assert second == "ok"
        recorded = db.get(job.job_id)
        assert recorded is not None and recorded.status is JobStatus.STOPPING
        statuses = [e.new_status for e in db.events(job.job_id)]
        assert statuses.count(JobStatus.STOPPING) == 1
    finally:
        db.dispose()
