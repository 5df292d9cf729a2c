"""Most agents failing at once holds back their losses, but nobody can keep that hold up.

Real sidecar and agent processes (agents that register themselves). Four registrations that never
heartbeat again (VMs scaled in right after registering, or anyone holding the fleet token: the test
sends one heartbeat each, from agents it serves for the call-back and then shuts) must not count in
the majority that holds losses back: a real agent SIGKILLed beside them is lost after
``lost_after_seconds`` and its job ends FAILED. And when most real agents do fall silent at once, their
losses are held back for at most ``[fleet] partition_hold_seconds``, with ``reconciler_agents_held``
counting them meanwhile. The hold's bookkeeping across a leadership term, and a drain sent through a
standby, are pinned in process (the fast tier).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from agent_api.registration import Heartbeat
from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.served import ServedAirflow, ServedApp
from harness.sidecar import SidecarProcess
from harness.wiring import nobody_waits
from reconciler.config import AgentEntry, FleetConfig
from reconciler.fleet.agent_state import AgentState
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.liveness import Fleet
from reconciler.metrics import Metrics
from router_db import RouterDB
from servicekit.credentials import Secret
from tests.heartbeats import beat
from tests.test_clock_skew import SteppedRouterDB
from tests.test_registration import FLEET_TOKEN, agents, calls, registering, submit
from tests.test_registration import sidecar_for as registration_sidecar

LOST_AFTER = 4.0
HOLD = 12.0


def sidecar_for(tmp_path: Path, airflow: ServedAirflow) -> SidecarProcess:
    return registration_sidecar(
        tmp_path,
        airflow,
        extra_config=(
            f"[leader]\nlease_seconds = {LOST_AFTER - 1}\n"
            f"[fleet]\nlost_after_seconds = {LOST_AFTER}\ncheck_interval_seconds = 0.2\n"
            f"check_timeout_seconds = 1.0\npartition_hold_seconds = {HOLD}\n"
        ),
    )


def ghost(agent_id: str) -> ServedApp:
    """Answers the sidecar's call-back as ``agent_id``, as an agent older than identities does."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "agent_id": agent_id})

    async def no_jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": []})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/health", healthz)
    app.router.add_get("/jobs", no_jobs)
    return ServedApp(app)


def register_once(sidecar: SidecarProcess, agent_id: str) -> None:
    """One registration, never a heartbeat after it; the VM is gone by the time it would send one."""
    served = ghost(agent_id)
    served.start()
    try:
        beat = Heartbeat(url=served.url, instance=f"{agent_id}-1", labels=("pool",), heartbeat_seconds=0.5)
        with sidecar.client(FLEET_TOKEN) as fleet:
            answer = fleet.put(f"/agents/{agent_id}", json=beat.to_json())
        assert answer.status_code in (200, 201), answer.text
    finally:
        served.stop()


def held(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("reconciler_agents_held "):
            return float(line.split()[1])
    raise AssertionError("no reconciler_agents_held in /metrics")


def three_live_agents(
    stack: ExitStack, tmp_path: Path, sidecar: SidecarProcess, client: httpx.Client
) -> list[AgentProcess]:
    real = [stack.enter_context(registering(tmp_path / f"vm{i}", sidecar, f"vm-{i}")) for i in range(3)]
    wait_for(lambda: all(agents(client).get(a.agent_id, {}).get("state") == "live" for a in real), "live")
    return real


def running_job(client: httpx.Client, airflow: ServedAirflow, agent: AgentProcess) -> str:
    """A job submitted to ``agent``, once its process runs there."""
    airflow.call_soon(airflow.standin.add, "d", "r", "long", -1, "running", 1)
    job: str = submit(client, "long", agent_id=agent.agent_id).json()["job_id"]
    on_agent = f"{agent.url}/jobs/{job}"
    wait_for(lambda: httpx.get(on_agent, headers=calls(agent), timeout=5).json()["pid"], "pid")
    return job


def kill(agent: AgentProcess) -> None:
    os.kill(agent.pid, signal.SIGKILL)
    agent.process.wait(timeout=10)


def test_registrations_that_never_heartbeat_again_hold_back_no_loss(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        real = three_live_agents(stack, tmp_path, sidecar, client)
        for i in range(4):
            register_once(sidecar, f"ghost-{i}")
        assert len(agents(client)) == 7
        job = running_job(client, airflow, real[0])

        kill(real[0])
        killed = time.monotonic()
        # Today's rule with the ghosts counted: 5 of 7 silent, a hold, and vm-0 suspect for good.
        wait_for(lambda: agents(client)["vm-0"]["state"] == "lost", "vm-0 lost", timeout=LOST_AFTER + 8)
        assert time.monotonic() - killed < HOLD  # not by the hold's expiry
        failed = wait_for(
            lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "FAILED" and j, "FAILED"
        )
        assert "agent vm-0 lost" in failed["reason"]
        # The ghosts fell silent about when vm-0 died: lost by the same rule, within a tick or two of it.
        expected = {"vm-0": "lost", "vm-1": "live", "vm-2": "live"} | {f"ghost-{i}": "lost" for i in range(4)}
        wait_for(
            lambda: {agent_id: entry["state"] for agent_id, entry in agents(client).items()} == expected,
            "the ghosts lost too, the others live",
            timeout=LOST_AFTER,
        )
        assert held(client) == 0
        assert "fail their health checks at once" not in sidecar.log_path.read_text()


def test_most_agents_silent_at_once_are_held_back_for_partition_hold_seconds(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        real = three_live_agents(stack, tmp_path, sidecar, client)
        time.sleep(1.5)  # heartbeats every 0.5 s: each has sent some since it registered (confirmed)
        job = running_job(client, airflow, real[0])

        kill(real[0])
        kill(real[1])
        silent = time.monotonic()
        wait_for(lambda: held(client) == 2, "two losses held back", timeout=LOST_AFTER + 8)
        assert {agents(client)[a]["state"] for a in ("vm-0", "vm-1")} == {"suspect"}
        assert client.get(f"/jobs/{job}").json()["status"] == "RUNNING"
        assert "2 of 3 agents fail their health checks at once" in sidecar.log_path.read_text()

        wait_for(
            lambda: agents(client)["vm-0"]["state"] == "lost", "lost once the hold ends", timeout=HOLD + 8
        )
        assert time.monotonic() - silent >= LOST_AFTER + HOLD - 1  # held from when the loss was due
        assert agents(client)["vm-1"]["state"] == "lost" and agents(client)["vm-2"]["state"] == "live"
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "FAILED", "its job FAILED")
        assert held(client) == 0
        assert "declared lost as any silent agent is" in sidecar.log_path.read_text()


@pytest.mark.fast
def test_a_term_that_ends_while_holding_exports_no_held_agent_from_the_standby(tmp_path: Path) -> None:
    db = SteppedRouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    config = FleetConfig(
        lost_after_seconds=2.0,
        check_interval_seconds=0.5,
        check_timeout_seconds=0.5,
        partition_hold_seconds=60.0,
    )
    ticks = [1000.0]
    metrics = Metrics()
    pool = AgentPool([], {}, timeout=1, stop_timeout=1)
    fleet = Fleet(
        db=db,
        agents=pool,
        metrics=metrics,
        config=config,
        clock=lambda: ticks[0],
        registered_token=Secret("t"),
        changed=nobody_waits,
    )

    async def tick(seconds: float, beating: list[str]) -> None:
        for _ in range(int(seconds / 0.5)):
            ticks[0] += 0.5
            db.step += 0.5
            for agent_id in beating:
                beat(db, agent_id, instance=agent_id)
            await fleet.load_registered()
            await fleet.tick()

    def held() -> float | None:
        return metrics.registry.get_sample_value("reconciler_agents_held")

    async def scenario() -> None:
        try:
            await tick(2.0, ["a", "b", "c"])  # registered, then heartbeats: confirmed
            await tick(4.0, ["a"])  # b and c fall silent past lost_after_seconds: 2 of 3
            assert held() == 2 and fleet.state("b") is AgentState.SUSPECT
            fleet.reset()  # the term ends: this replica is a standby now
            assert held() == 0
        finally:
            await fleet.close()
            await pool.close()
            db.dispose()

    asyncio.run(scenario())


@pytest.mark.fast
def test_a_drain_sent_through_a_standby_is_not_wanted_again_once_the_agent_took_it(tmp_path: Path) -> None:
    """A standby runs no health checks: the configured agent's own answer is all it will hear, so the
    flag it took is the agent's, and a later undrain through the leader is not undone by this replica."""

    async def drain(request: web.Request) -> web.Response:
        return web.json_response({"agent_id": "vm-s", "draining": True, "jobs_running": 0})

    async def scenario() -> bool:
        app = web.Application()
        app.router.add_post("/drain", drain)
        server = ServedApp(app)
        server.start()
        db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
        db.create_schema()
        pool = AgentPool(
            [AgentEntry(id="vm-s", url=server.url)],
            {"vm-s": Secret("agent-token-for-the-standby")},
            timeout=1,
            stop_timeout=1,
        )
        fleet = Fleet(db=db, agents=pool, metrics=Metrics(), config=FleetConfig(), changed=nobody_waits)
        try:
            await fleet.drain("vm-s", draining=True)
            return fleet._agents["vm-s"].drain_wanted is None
        finally:
            await fleet.close()
            await pool.close()
            server.stop()
            db.dispose()

    assert asyncio.run(scenario())
