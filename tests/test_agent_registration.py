"""The agent's heartbeat sender against a stand-in sidecar: what it sends, and how it waits when the
sidecar fails (a failed heartbeat with changes pending must not turn into a retry storm)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.config import load_config
from agent.registration import Registration, Work
from agent_api.protocol import AgentJobStatus, JobInfo
from servicekit.credentials import Secret


class Feed:
    """One job that changed, and a cursor that never moves unless acknowledged."""

    def __init__(self) -> None:
        self.job = JobInfo("job-1", AgentJobStatus.SUCCEEDED, 7, 0, None, None, None)
        self.delivered: list[str] = []

    def changes_since(self, cursor: str | None) -> tuple[list[JobInfo], str, bool]:
        if cursor is None:
            return [], "e.1", True
        return ([self.job], "e.2", False) if cursor == "e.1" else ([], cursor, False)

    async def wait_for_change(self, cursor: str | None, timeout: float) -> bool:
        if cursor == "e.1":
            return True  # a change is pending from that cursor: answered at once
        await asyncio.sleep(timeout)
        return False

    async def mark_delivered(self, jobs: Iterable[JobInfo]) -> None:
        self.delivered += [job.job_id for job in jobs]


async def heartbeats_against(tmp_path: Path, answers: list[int], seconds: float) -> tuple[list[Any], Feed]:
    """Run the sender for ``seconds`` against a sidecar answering ``answers`` in turn (then 200)."""
    bodies: list[Any] = []

    async def put(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        status = answers.pop(0) if answers else 200
        return web.json_response({"error": "no"} if status != 200 else {"agent_id": "vm-t"}, status=status)

    app = web.Application()
    app.router.add_put("/agents/{agent_id}", put)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    env = {"AGENTIC_FLEET_TOKEN": "fleet", "ROUTER_URL": str(server.make_url("")), "AGENT_ID": "vm-t"}
    config = load_config(
        None, environ={**env, "AGENTIC_AGENT_HOME": str(tmp_path), "AGENTIC_AGENT_HEARTBEAT_SECONDS": "1"}
    )
    feed = Feed()
    sender = Registration(
        config, token=Secret(("fleet",)), work=lambda: Work(0, 1, False), version="t", feed=feed
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 5)
    await server.close()
    return bodies, feed


@pytest.mark.fast
def test_failed_heartbeats_back_off_and_their_changes_come_again_once_accepted(tmp_path: Path) -> None:
    # Accepted once (cursor e.1), then the sidecar fails (503) for the rest of the time with a change
    # pending: retries after 0.5 s, then at the period (1 s), never at the pace of the pending change.
    bodies, feed = asyncio.run(heartbeats_against(tmp_path, [200] + [503] * 100, seconds=3.0))
    assert 3 <= len(bodies) <= 6, len(bodies)
    pushed = bodies[1:]
    assert pushed and all(b["cursor"] == "e.2" and b["jobs"][0]["job_id"] == "job-1" for b in pushed)
    assert feed.delivered == []  # never acknowledged: sent again each time
    assert not any(b["leaving"] for b in bodies)  # unregistered at the end: no last word
    assert all(b["instance"] == bodies[0]["instance"] for b in bodies)

    bodies, feed = asyncio.run(heartbeats_against(tmp_path, [200, 503, 503], seconds=3.0))
    assert feed.delivered == ["job-1"]  # accepted at the third try: delivered once
    assert [b["cursor"] for b in bodies if b["jobs"]] == ["e.2", "e.2", "e.2"]
    assert bodies[-1]["leaving"] is True and not any(b["leaving"] for b in bodies[:-1])


@pytest.mark.fast
def test_a_refused_heartbeat_leaves_its_changes_to_the_catch_up_read(tmp_path: Path) -> None:
    bodies, feed = asyncio.run(heartbeats_against(tmp_path, [200, 409, 409], seconds=2.5))
    assert len(bodies) <= 5, len(bodies)  # a refusal waits the period (1 s)
    assert [bool(b["jobs"]) for b in bodies[:3]] == [False, True, False]  # not sent again after a 409
    assert feed.delivered == []
