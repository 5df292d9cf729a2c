"""An agent taken out of ``[[agents]]`` while it has active jobs: the sidecar restarted with the entry
removed ends those jobs FAILED ("agent vm2 is no longer configured ..."), says so loudly at start, and
goes on: every cycle succeeds, ``/readyz`` is ready, and the job's log answers 410 with a JSON error.
A registered agent is not in ``[[agents]]`` either, yet it is known (the router DB's ``agents`` table):
its job runs on, as does a configured agent's.

Real processes: two configured agents, one registered agent, the sidecar, restarted with one entry less.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

FLEET_TOKEN = "fleet-token-for-tests"
INTERVAL = 0.5
# lost_after_seconds is also how long an agent must stay missing from the config before its jobs end.
GRACE = 6.0
FLEET = f"[fleet]\nlost_after_seconds = {GRACE}\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
REASON = "agent vm2 is no longer configured (not in [[agents]] and not registered)"


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    served.start()
    try:
        yield served
    finally:
        served.stop()


def submit(client: httpx.Client, airflow: ServedAirflow, agent_id: str, task_id: str) -> str:
    airflow.call_soon(airflow.standin.add, "d", "r", task_id, -1, "deferred", 1)  # Airflow wants it
    body = {"command": "sleep 300", "agent_id": agent_id, "dag_id": "d", "task_id": task_id, "run_id": "r"}
    answer = client.post("/jobs", json={**body, "try_number": 1})
    assert answer.status_code == 201 and answer.json()["status"] == "RUNNING", answer.text
    return str(answer.json()["job_id"])


def status(client: httpx.Client, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
    return answer


def cycles(client: httpx.Client) -> dict[str, float]:
    """``reconciler_cycles_total`` by result."""
    text = client.get("/metrics").text
    found = re.finditer(r'^reconciler_cycles_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {m[1]: float(m[2]) for m in found}


def test_a_removed_agents_jobs_end_failed_and_every_cycle_succeeds(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    vm1 = AgentProcess(tmp_path / "vm1", agent_id="vm1", token="t1")
    vm2 = AgentProcess(tmp_path / "vm2", agent_id="vm2", token="t2")
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[AgentRef("vm1", vm1.url, "t1"), AgentRef("vm2", vm2.url, "t2")],
        api_version="v2",
        interval_seconds=INTERVAL,
        fleet_token=FLEET_TOKEN,
        extra_config=FLEET,
        lease_seconds=5.0,  # below lost_after_seconds, as the settings' agreement asks
    )
    vm3_port = free_port()
    vm3 = AgentProcess(  # registers itself: in the router DB's agents table, not in [[agents]]
        tmp_path / "vm3",
        agent_id="vm3",
        port=vm3_port,
        token=FLEET_TOKEN,
        accepted_tokens=[],
        extra_config="heartbeat_seconds = 0.5\n",
        extra_env={
            "ROUTER_URL": sidecar.url,
            "SELF_URL": f"http://127.0.0.1:{vm3_port}",
            "AGENTIC_FLEET_TOKEN": FLEET_TOKEN,
            "AGENTIC_AGENT_TOKEN": "",
        },
    )
    try:
        vm1.start()
        vm2.start()
        sidecar.start()
        vm3.start()
        with sidecar.client() as client:
            wait_for(
                lambda: "vm3" in {a["agent_id"] for a in client.get("/agents").json()["agents"]},
                "vm3's registration",
                30,
            )
            kept = submit(client, airflow, "vm1", "kept")
            removed = submit(client, airflow, "vm2", "removed")
            registered = submit(client, airflow, "vm3", "registered")

        sidecar.stop()
        sidecar.agents = [AgentRef("vm1", vm1.url, "t1")]  # vm2's entry removed, its job still running
        started = time.monotonic()
        sidecar.start()
        with sidecar.client() as client:
            ended = wait_for(
                lambda: (s := status(client, removed))["status"] != "RUNNING" and s,
                "the removed agent's job",
                30 + GRACE,
            )
            took = time.monotonic() - started
            assert ended["status"] == "FAILED", ended
            assert ended["reason"] == REASON
            # Not before the agent was missing for the grace (a config rendered half ends nothing at once).
            assert GRACE <= took < 30 + GRACE, took

            time.sleep(5 * INTERVAL)  # more cycles: they succeed, and nothing else is ended
            counted = cycles(client)
            assert counted.get("ok", 0) >= 3, counted
            assert counted.get("error", 0) == 0 and counted.get("db_error", 0) == 0, counted
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert status(client, kept)["status"] == "RUNNING"
            assert status(client, registered)["status"] == "RUNNING"

            log = client.get(f"/jobs/{removed}/log")
            assert log.status_code == 410, log.text
            assert log.headers["content-type"].startswith("application/json")
            assert "agent vm2 is no longer configured" in log.json()["error"]
            assert client.get(f"/jobs/{kept}/log").status_code == 200

        lines = [
            json.loads(line) for line in sidecar.log_path.read_text().splitlines() if line.startswith("{")
        ]
        loud = [line for line in lines if line["level"] == "error" and "vm2" in line["msg"]]
        assert loud and "no longer configured" in loud[0]["msg"], lines[-20:]
        assert not any("vm3" in line["msg"] and "no longer configured" in line["msg"] for line in lines)
    finally:
        sidecar.stop()
        vm3.stop()
        vm2.stop()
        vm1.stop()
