"""Most agents failing at once holds back their losses, but nobody can keep that hold up.

Real sidecar and agent processes (agents that register themselves). Four registrations that never
heartbeat again (VMs scaled in right after registering, or anyone holding the fleet token: the test
sends one heartbeat each, from agents it serves for the call-back and then shuts) must not count in
the majority that holds losses back: a real agent SIGKILLed beside them is lost after
``lost_after_seconds`` and its job ends FAILED. And when most real agents do fall silent at once, their
losses are held back for at most ``[fleet] partition_hold_seconds``, with ``reconciler_agents_held``
counting them meanwhile.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from aiohttp import web

from agent_api.registration import Heartbeat
from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.served import ServedAirflow, ServedApp
from harness.sidecar import SidecarProcess
from tests.test_registration import FLEET_TOKEN, agents, auth, registering, submit

LOST_AFTER = 4.0
HOLD = 12.0


def sidecar_for(tmp_path: Path, airflow: ServedAirflow) -> SidecarProcess:
    return SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[],
        api_version="v2",
        fleet_token=FLEET_TOKEN,
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


def kill(agent: AgentProcess) -> None:
    os.kill(agent.pid, signal.SIGKILL)
    agent.process.wait(timeout=10)


def test_registrations_that_never_heartbeat_again_hold_back_no_loss(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        real = [stack.enter_context(registering(tmp_path / f"vm{i}", sidecar, f"vm-{i}")) for i in range(3)]
        wait_for(lambda: all(agents(client).get(a.agent_id, {}).get("state") == "live" for a in real), "live")
        for i in range(4):
            register_once(sidecar, f"ghost-{i}")
        assert len(agents(client)) == 7
        airflow.call_soon(airflow.standin.add, "d", "r", "long", -1, "running", 1)
        job = submit(client, "long", agent_id="vm-0").json()["job_id"]
        wait_for(
            lambda: httpx.get(f"{real[0].url}/jobs/{job}", headers=auth(), timeout=5).json()["pid"], "pid"
        )

        kill(real[0])
        killed = time.monotonic()
        # Today's rule with the ghosts counted: 5 of 7 silent, a hold, and vm-0 suspect for good.
        wait_for(lambda: agents(client)["vm-0"]["state"] == "lost", "vm-0 lost", timeout=LOST_AFTER + 8)
        assert time.monotonic() - killed < HOLD  # not by the hold's expiry
        failed = wait_for(
            lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "FAILED" and j, "FAILED"
        )
        assert "agent vm-0 lost" in failed["reason"]
        states = {agent_id: entry["state"] for agent_id, entry in agents(client).items()}
        assert states == {"vm-0": "lost", "vm-1": "live", "vm-2": "live"} | {
            f"ghost-{i}": "lost" for i in range(4)
        }
        assert held(client) == 0
        assert "fail their health checks at once" not in sidecar.log_path.read_text()


def test_most_agents_silent_at_once_are_held_back_for_partition_hold_seconds(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        real = [stack.enter_context(registering(tmp_path / f"vm{i}", sidecar, f"vm-{i}")) for i in range(3)]
        wait_for(lambda: all(agents(client).get(a.agent_id, {}).get("state") == "live" for a in real), "live")
        time.sleep(1.5)  # heartbeats every 0.5 s: each has sent some since it registered (confirmed)
        airflow.call_soon(airflow.standin.add, "d", "r", "long", -1, "running", 1)
        job = submit(client, "long", agent_id="vm-0").json()["job_id"]
        wait_for(
            lambda: httpx.get(f"{real[0].url}/jobs/{job}", headers=auth(), timeout=5).json()["pid"], "pid"
        )

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
        assert time.monotonic() - silent >= HOLD - 1
        assert agents(client)["vm-1"]["state"] == "lost" and agents(client)["vm-2"]["state"] == "live"
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "FAILED", "its job FAILED")
        assert held(client) == 0
        assert "declared lost as any silent agent is" in sidecar.log_path.read_text()
