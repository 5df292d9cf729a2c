"""The trigger's poll as a long-poll: ``GET /jobs/{id}?wait=`` hears of the job's end at once and
asks rarely; against a sidecar that predates ``wait`` (it answers at once) it polls as before, every
``poll_interval``.

First against in-process stand-ins of the sidecar (one honours ``wait``, one ignores it), then the
whole path: a real agent, a real sidecar, the trigger's poller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentic_airflow.polling import LONG_POLL_SECONDS, JobPoller, long_poll_seconds
from agentic_airflow.sidecar_client import SidecarEndpoint, job_query
from harness.agent import AgentProcess
from harness.recording_log import RecordingLog
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

JOB = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"


async def endpoint(conn_id: str) -> SidecarEndpoint:
    return SidecarEndpoint("http://sidecar.test:8790", "token")


class StandInSidecar:
    """A job RUNNING until :meth:`end`; ``honours_wait``: answers a long-poll once the job's status
    differs from the one named, or ``wait`` passes, as the sidecar does; otherwise at once."""

    def __init__(self, *, honours_wait: bool) -> None:
        self.honours_wait = honours_wait
        self.status = "RUNNING"
        self.changed = asyncio.Event()
        self.polls: list[dict[str, str]] = []

    def end(self) -> float:
        self.status = "FAILED"
        self.changed.set()
        return time.monotonic()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/log"):
            return httpx.Response(200, content=b"", headers={"X-Log-Size": "0", "X-Next-Offset": "0"})
        params = dict(request.url.params)
        self.polls.append(params)
        wait = float(params.get("wait", 0)) if self.honours_wait else 0.0
        if wait and params.get("status", self.status) == self.status:
            try:
                await asyncio.wait_for(self.changed.wait(), wait)
            except TimeoutError:
                pass
        return httpx.Response(200, json={"job_id": JOB, "status": self.status, "rc": 3, "reason": "exited"})


def poller(sidecar: StandInSidecar, **options: Any) -> JobPoller:
    return JobPoller(
        job_id=JOB,
        conn_id="agentic_run_default",
        resolve=endpoint,
        log=RecordingLog(),
        transport=httpx.MockTransport(sidecar),
        **options,
    )


@pytest.mark.fast
def test_the_long_poll_waits_the_poll_interval_when_showing_output_and_half_a_minute_otherwise() -> None:
    assert long_poll_seconds(5.0, streams_output=True) == 5.0
    assert long_poll_seconds(120.0, streams_output=True) == LONG_POLL_SECONDS == 30.0
    assert long_poll_seconds(5.0, streams_output=False) == LONG_POLL_SECONDS
    assert job_query(wait=30.0, status="RUNNING") == {"wait": "30", "status": "RUNNING"}
    assert job_query(wait=0.1) == {"wait": "0.1"}
    assert job_query(wait=1e-9, status="RUNNING") == {}  # never "1e-09", which the sidecar refuses
    assert job_query(wait=5, status="NOT-A-STATUS") == {"wait": "5"}
    assert job_query(wait=600) == {"wait": "60"}


@pytest.mark.fast
@pytest.mark.parametrize(
    ("log_offset", "end_after", "polls"),
    [
        (None, 1.2, [{"wait": "30"}]),  # no output to show: one poll waits for the end
        # Output shown every poll interval: the second poll names the status it knows.
        (0, 5.5, [{"wait": "5"}, {"wait": "5", "status": "RUNNING"}]),
    ],
)
def test_the_trigger_fires_its_event_right_after_the_exit(
    log_offset: int | None, end_after: float, polls: list[dict[str, str]]
) -> None:
    async def scenario() -> tuple[dict[str, Any], float, StandInSidecar]:
        sidecar = StandInSidecar(honours_wait=True)
        task = asyncio.create_task(poller(sidecar, poll_interval=5.0, log_offset=log_offset).run())
        await asyncio.sleep(end_after)
        ended_at = sidecar.end()
        event = await task
        return event, time.monotonic() - ended_at, sidecar

    event, latency, sidecar = asyncio.run(scenario())
    assert (event["status"], event["rc"]) == ("FAILED", 3)
    assert latency < 0.3  # a 5 s poll interval, and the end heard at once
    assert sidecar.polls == polls


@pytest.mark.fast
def test_against_a_sidecar_without_wait_the_trigger_polls_every_poll_interval() -> None:
    sleeps: list[float] = []

    async def scenario() -> dict[str, Any]:
        sidecar = StandInSidecar(honours_wait=False)

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == 3:
                sidecar.end()

        return await poller(sidecar, poll_interval=5.0, log_offset=None, sleep=sleep).run()

    event = asyncio.run(scenario())
    assert event["status"] == "FAILED"
    assert len(sleeps) == 3 and all(4.9 <= s <= 5.0 for s in sleeps)  # as before the long-poll


# --- the whole path --------------------------------------------------------------------------------------


def test_through_a_real_sidecar_the_event_follows_the_recorded_exit_at_once(tmp_path: Path) -> None:
    airflow = ServedAirflow()
    airflow.standin.add("d", "r", "t", -1, "deferred", 1)  # Airflow wants the task to go on
    airflow.start()
    try:
        with (
            AgentProcess(tmp_path / "agent", agent_id="agent-1", token="agent-token") as agent,
            SidecarProcess(
                workdir=tmp_path / "sidecar",
                airflow_url=airflow.url,
                airflow_password="stand-in",
                agents=[AgentRef("agent-1", agent.url, agent.token)],
                api_version="v2",
                interval_seconds=1.0,
            ) as sidecar,
            sidecar.client() as client,
        ):
            submitted = client.post(
                "/jobs",
                json={
                    "command": "sleep 2; exit 3",
                    "agent_id": "agent-1",
                    "dag_id": "d",
                    "task_id": "t",
                    "run_id": "r",
                    "try_number": 1,
                },
            )
            assert submitted.status_code == 201, submitted.text
            job_id = submitted.json()["job_id"]

            async def resolve(conn_id: str) -> SidecarEndpoint:
                return SidecarEndpoint(sidecar.url, sidecar.token)

            the_poller = JobPoller(
                job_id=job_id,
                conn_id="agentic_run_default",
                resolve=resolve,
                log=RecordingLog(),
                poll_interval=5.0,
                log_offset=None,
            )
            event = asyncio.run(the_poller.run())
            heard = time.time()
            job = client.get(f"/jobs/{job_id}").json()
    finally:
        airflow.stop()
    assert (event["status"], event["rc"], job["status"]) == ("FAILED", 3, "FAILED")
    recorded = datetime.fromisoformat(job["finished_at"]).timestamp()
    assert heard - recorded < 0.5  # the exit recorded by the loop's catch-up, the event at once


@pytest.mark.fast
def test_an_output_read_stuck_at_a_hung_agent_delays_the_jobs_end_by_at_most_its_bound() -> None:
    """The sidecar forwards output reads to the agent; a paused agent never answers. The trigger gives
    that read up after OUTPUT_READ_SECONDS and hears of the end at its next long-poll."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from agentic_airflow.polling import OUTPUT_READ_SECONDS

    state = {"status": "RUNNING"}
    ended = asyncio.Event()
    hung = asyncio.Event()  # never set: the agent behind the sidecar is paused

    async def job(request: web.Request) -> web.Response:
        if request.query.get("wait") and state["status"] == request.query.get("status"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), float(request.query["wait"]))
        return web.json_response({"job_id": JOB, "status": state["status"], "rc": None, "reason": "lost"})

    async def log(request: web.Request) -> web.Response:
        await hung.wait()
        raise AssertionError("unreachable")

    async def scenario() -> float:
        app = web.Application()
        app.router.add_get("/jobs/{job_id}", job)
        app.router.add_get("/jobs/{job_id}/log", log)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()

        async def resolve(conn_id: str) -> SidecarEndpoint:
            return SidecarEndpoint(str(server.make_url("")).rstrip("/"), "token")

        poller = JobPoller(job_id=JOB, conn_id="c", resolve=resolve, log=RecordingLog(), poll_interval=0.2)
        running = asyncio.create_task(poller.run())
        await asyncio.sleep(0.5)  # the trigger is inside a stuck output read now
        state["status"], at = "FAILED", time.monotonic()
        ended.set()
        event = await asyncio.wait_for(running, 30)
        heard = time.monotonic() - at
        assert event["status"] == "FAILED"
        await server.close()
        return heard

    heard = asyncio.run(scenario())
    assert heard <= OUTPUT_READ_SECONDS + 1.0, heard
