"""Load: a sustained submission rate to the sidecar for 30 s with its loop running.

120 submissions per second (``AGENTIC_LOAD_RATE`` overrides it). What must hold: every answer 201, no
row lost or doubled, none stopped, the sidecar alive, and the whole schedule served within three times
its length (a collapse of throughput). Latencies are printed (run with ``-s``), not graded: on this
2-core virtual machine, which also hosts the test's driver and stand-ins, the sidecar's capacity
follows the host's neighbours (186-192/s on 2026-11-24; 95-179/s on 2026-11-29 within one hour, the
code of both days alike), and past capacity an open-loop schedule measures only its own queue.
Performance figures come from ``bench/RESULTS.md``.

A real sidecar process (router DB on SQLite) with its poll loop running against the Airflow stand-in
of ``bench.standins`` (every submitted task instance exists there, ``running``, so the loop keeps
every job). The agent is an in-process stand-in that accepts ``POST /run`` at once (a real agent
would spend the machine on 6000 process launches; the sidecar's path is what is measured). The
test drives an open-loop schedule from asyncio (each request leaves at its planned time, whatever
the previous ones are doing), each a distinct task-instance key, then checks every answer and the
router DB. Latency figures are printed (visible with ``-s``). Loopback only; bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import func, select

from harness.served import ServedAirflow, ServedApp
from harness.sidecar import AgentRef, SidecarProcess
from router_db import RouterDB
from router_db.models import JobRow

RATE = float(os.environ.get("AGENTIC_LOAD_RATE", "120"))  # submissions per second
SECONDS = float(os.environ.get("AGENTIC_LOAD_SECONDS", "30"))  # shorter for a quick local look
TOTAL = int(RATE * SECONDS)


class InstantAgent(ServedApp):
    """An agent that accepts every job at once and reports it running; served from a thread."""

    def __init__(self) -> None:
        self.runs = 0
        app = web.Application()
        app.router.add_post("/run", self.run)
        app.router.add_get("/jobs/{job_id}", self.job)
        app.router.add_get("/health", self.health)
        super().__init__(app)

    @staticmethod
    def info(job_id: str) -> dict[str, object]:
        return {
            "job_id": job_id,
            "status": "RUNNING",
            "pid": 1,
            "rc": None,
            "started_at": None,
            "finished_at": None,
            "reason": None,
        }

    async def run(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.runs += 1
        return web.json_response(self.info(str(body["job_id"])), status=201)

    async def job(self, request: web.Request) -> web.Response:
        return web.json_response(self.info(request.match_info["job_id"]))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


@pytest.fixture
def agent() -> Iterator[InstantAgent]:
    served = InstantAgent()
    served.start()
    yield served
    served.stop()


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    for i in range(TOTAL):
        served.standin.add("load", f"run-{i}", "t", -1, state="running", try_number=1)
    served.start()
    yield served
    served.stop()


async def drive(url: str, token: str) -> tuple[list[float], list[int], float]:
    """Open loop: request ``i`` leaves at ``i / RATE`` s; latencies, statuses, achieved seconds."""
    latencies: list[float] = [0.0] * TOTAL
    statuses: list[int] = [0] * TOTAL
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {token}"}
    # As long as the collapse bound below: on a machine whose neighbours halve the sidecar's capacity,
    # the open-loop schedule queues, and the answers come late but must all come.
    timeout = aiohttp.ClientTimeout(total=3 * SECONDS)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:

        async def one(i: int) -> None:
            body = {
                "command": "exit 0",
                "agent_id": "agent-1",
                "dag_id": "load",
                "task_id": "t",
                "run_id": f"run-{i}",
                "map_index": -1,
                "try_number": 1,
            }
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/jobs", json=body) as answer:
                    await answer.read()
                    statuses[i] = answer.status
            except (aiohttp.ClientError, TimeoutError):
                statuses[i] = -1
            latencies[i] = time.monotonic() - sent

        started = time.monotonic()
        tasks = []
        for i in range(TOTAL):
            delay = started + i / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        sending = time.monotonic() - started
    return latencies, statuses, sending


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_sustained_submissions_for_30_s_with_the_loop_running_lose_nothing(
    tmp_path: Path, agent: InstantAgent, airflow: ServedAirflow
) -> None:
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[AgentRef("agent-1", agent.url, "unused", labels=["default"])],
        api_version="v2",
        interval_seconds=1.0,
    )
    db: RouterDB | None = None
    try:
        sidecar.start()
        latencies, statuses, took = asyncio.run(drive(sidecar.url, sidecar.token))
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        print(
            f"\nload: {TOTAL} submissions in {took:.1f} s ({TOTAL / took:.0f}/s, target {RATE:.0f}/s);"
            f" latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
        )
        bad = {s: statuses.count(s) for s in set(statuses) if s != 201}
        assert not bad, f"answers other than 201: {bad}"
        assert agent.runs == TOTAL
        db = RouterDB(f"sqlite:///{sidecar.workdir / 'router.db'}")
        with db.engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(JobRow)).scalar_one()
        assert count == TOTAL  # none lost, none doubled
        assert len(db.active()) == TOTAL  # and the loop stopped none of them
        assert sidecar.proc is not None and sidecar.proc.poll() is None
        assert took < 3 * SECONDS, f"throughput collapsed: {TOTAL} submissions took {took:.1f} s"
    finally:
        sidecar.stop()
        if db is not None:
            db.dispose()
