"""An agent's life cycle through the CLI, with real processes: maintenance with a comment, and a drain
bounded by a timeout.

``agentic agents maintenance ID --comment`` drains the agent (no new job, running ones go on) and the
comment, with who set it and when, is shown by ``agents list``, ``GET /agents`` and ``/ui/agents``,
through restarts of the agent and of the sidecar (SIGTERM, started again), for an agent in
``[[agents]]`` and for one that registers itself; ``--off`` ends it. ``agentic agents drain ID
--timeout 3s`` stops what still runs once the timeout has passed, recorded as such on the agent and
in the router DB; bad durations and bodies are refused and change nothing.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentic_cli.__main__ import main
from harness.agent import AgentProcess
from harness.processes import alive, process_group, wait_for
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from tests.test_agent_credentials import registering, sidecar_for

COMMENT = "kernel 6.12 upgrade, back by 14:00"


def cli(sidecar: SidecarProcess, *args: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setenv("AGENTIC_SIDECAR_URL", sidecar.url)
    monkeypatch.setenv("AGENTIC_TOKEN", sidecar.token)
    out = io.StringIO()
    return main(list(args), out=out), out.getvalue()


def listed(sidecar: SidecarProcess, agent_id: str) -> dict[str, Any]:
    with sidecar.client() as client:
        agents = {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}
    return dict(agents[agent_id])


def ui_agents(sidecar: SidecarProcess) -> str:
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        client.post("/ui/login", data={"token": sidecar.token})
        return client.get("/ui/agents").text


def in_maintenance(sidecar: SidecarProcess, agent_id: str) -> dict[str, Any]:
    shown = wait_for(
        lambda: (a := listed(sidecar, agent_id))["maintenance"] is not None and a["draining"] and a,
        f"{agent_id} shown in maintenance",
        20,
    )
    assert shown["maintenance"]["comment"] == COMMENT, shown
    assert "through agentic agents maintenance" in shown["maintenance"]["by"], shown
    return dict(shown)


def test_maintenance_with_a_comment_outlives_restarts_of_the_agent_and_the_sidecar(
    tmp_path: Path, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = AgentProcess(tmp_path / "vm", agent_id="vm-m")
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        api_version="v2",
        agents=[AgentRef("vm-m", agent.url, agent.token, labels=["pool"])],
        interval_seconds=1.0,
    )
    with agent, sidecar:
        wait_for(lambda: listed(sidecar, "vm-m")["state"] == "live", "vm-m live", 20)
        code, said = cli(
            sidecar, "agents", "maintenance", "vm-m", "--comment", COMMENT, monkeypatch=monkeypatch
        )
        assert code == 0 and COMMENT in said, said
        since = in_maintenance(sidecar, "vm-m")["maintenance"]["since"]
        with sidecar.client() as client:
            gauge = 'reconciler_agents_in_maintenance{by="operator"} 1.0'
            wait_for(lambda: gauge in client.get("/metrics").text, "the gauge counts it", 10)
        code, table = cli(sidecar, "agents", "list", monkeypatch=monkeypatch)
        assert code == 0 and "MAINTENANCE" in table and COMMENT in table, table
        assert COMMENT in ui_agents(sidecar)
        # A job for it is refused now: no agent the route allows has room.
        with sidecar.client() as client:
            body = {"command": "true", "labels": ["pool"], "dag_id": "m", "task_id": "t", "run_id": "r",
                    "map_index": -1, "try_number": 1}  # fmt: skip
            airflow.call_soon(airflow.standin.add, "m", "r", "t", -1, "running", 1)
            refused = client.post("/jobs", json=body)
        assert refused.status_code == 503 and "draining" in refused.text, refused.text

        agent.stop()  # SIGTERM, then started again on its home
        agent.start()
        sidecar.stop()
        sidecar.start()
        shown = in_maintenance(sidecar, "vm-m")
        assert shown["maintenance"]["since"] == since, shown  # the same maintenance, not a new one

        assert (
            cli(sidecar, "agents", "maintenance", "vm-m", "--off", "--comment", "x", monkeypatch=monkeypatch)[
                0
            ]
            == 2
        )
        code, said = cli(sidecar, "--json", "agents", "maintenance", "vm-m", "--off", monkeypatch=monkeypatch)
        assert code == 0 and json.loads(said)["maintenance"] is None and not json.loads(said)["draining"]
        wait_for(lambda: listed(sidecar, "vm-m")["maintenance"] is None, "maintenance over", 20)
        assert not (tmp_path / "vm" / "draining.json").exists()


def test_a_registered_agents_maintenance_is_kept_in_the_router_db_across_a_sidecar_restart(
    tmp_path: Path, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    with sidecar_for(tmp_path, airflow) as sidecar, registering(tmp_path / "vm", sidecar, "vm-r"):
        wait_for(lambda: listed(sidecar, "vm-r")["state"] == "live", "vm-r registered", 20)
        assert (
            cli(sidecar, "agents", "maintenance", "vm-r", "--comment", COMMENT, monkeypatch=monkeypatch)[0]
            == 0
        )
        in_maintenance(sidecar, "vm-r")
        sidecar.stop()
        sidecar.start()  # what it shows comes from the router DB's row until the next heartbeat
        in_maintenance(sidecar, "vm-r")


def test_a_drain_with_a_timeout_stops_what_still_runs_and_says_so(
    tmp_path: Path, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = AgentProcess(tmp_path / "vm", agent_id="vm-d", grace_seconds=0.5)
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        api_version="v2",
        agents=[AgentRef("vm-d", agent.url, agent.token, labels=["pool"])],
        interval_seconds=1.0,
    )
    with agent, sidecar, sidecar.client() as client:
        airflow.call_soon(airflow.standin.add, "d", "r", "long", -1, "running", 1)
        body = {"command": "sleep 300 & sleep 300; wait", "agent_id": "vm-d", "dag_id": "d",
                "task_id": "long", "run_id": "r", "map_index": -1, "try_number": 1}  # fmt: skip
        job = client.post("/jobs", json=body).json()

        def status(wanted: str) -> dict[str, Any] | None:
            found = client.get(f"/jobs/{job['job_id']}").json()
            return dict(found) if found["status"] == wanted else None

        running = wait_for(lambda: status("RUNNING"), "the job runs", 20)
        on_agent = httpx.get(
            f"{agent.url}/jobs/{running['job_id']}", headers={"Authorization": f"Bearer {agent.token}"}
        )
        tree = process_group(int(on_agent.json()["pid"]))

        for bad in ("0s", "soon", "-5m", "5 weeks"):
            assert (
                cli(sidecar, "agents", "drain", "vm-d", f"--timeout={bad}", monkeypatch=monkeypatch)[0] == 2
            )
        assert listed(sidecar, "vm-d")["draining"] is False  # nothing changed
        assert client.post("/agents/vm-d/drain", json={"timeout_seconds": -1}).status_code == 400
        assert client.post("/agents/vm-d/drain", json={"comment": "a\x00b"}).status_code == 400
        assert client.post("/agents/vm-d/undrain", json={"comment": "c"}).status_code == 400
        assert listed(sidecar, "vm-d")["draining"] is False

        drained_at = time.monotonic()
        assert cli(sidecar, "agents", "drain", "vm-d", "--timeout", "3s", monkeypatch=monkeypatch)[0] == 0
        time.sleep(2)
        assert alive(tree) == tree, "stopped before the timeout"
        wait_for(lambda: not alive(tree), "the job's tree stopped at the timeout", 15)
        took = time.monotonic() - drained_at
        assert 3 <= took <= 3 + 1 + 0.5 + 3, took  # a check a second, the grace, a loaded machine
        ended = wait_for(lambda: status("FAILED"), "the router DB hears of it", 20)
        assert ended["reason"].startswith("stopped: the drain timed out (drained by "), ended
        assert listed(sidecar, "vm-d")["maintenance"]["stop_at"] is not None
