"""``GET /agents`` and ``POST /agents/{id}/drain|undrain`` on a real sidecar with real agents.

A drained agent gets no new job, while the job it runs goes on to its end and can still be stopped;
an agent that cannot be reached is still routed around when drained (502 says the agent did not hear
it); the agent keeps the flag itself.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

FAST_FLEET = "[fleet]\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
ENTRY_KEYS = {
    "registered",
    "agent_id",
    "url",
    "labels",
    "state",
    "last_contact_at",
    "max_jobs",
    "active_jobs",
    "jobs_running",
    "version",
    "draining",
    "maintenance",
}


def agents(client: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = client.get("/agents")
    assert answer.status_code == 200, answer.text
    listed = answer.json()["agents"]
    assert [a["agent_id"] for a in listed] == sorted(a["agent_id"] for a in listed)  # id order
    return {a["agent_id"]: a for a in listed}


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return client.get(f"/jobs/{job_id}").json()  # type: ignore[no-any-return]


def test_a_drained_agent_gets_no_new_job_while_its_jobs_end_or_are_stopped(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    tasks = ["short", "long", *(f"after-{n}" for n in range(4)), "back"]
    for task in tasks:
        airflow.call_soon(airflow.standin.add, "d", "r", task, -1, "running", 1)
    with (
        AgentProcess(tmp_path / "a", agent_id="vm-a", token="token-a", max_jobs=4) as a,
        AgentProcess(tmp_path / "b", agent_id="vm-b", token="token-b") as b,
        SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[
                AgentRef("vm-a", a.url, a.token, labels=["batch"]),
                AgentRef("vm-b", b.url, b.token, labels=["batch"]),
                AgentRef("vm-gone", nowhere, "token-gone", labels=["batch"]),
            ],
            api_version="v2",
            interval_seconds=0.3,
            extra_config=FAST_FLEET,
        ) as sidecar,
        sidecar.client() as client,
        sidecar.client(token="not-the-token") as stranger,
    ):
        wait_for(lambda: agents(client)["vm-a"]["max_jobs"] == 4, "vm-a's health answer")
        # The unreachable one never answered: drained all the same, the flag routes around it.
        gone = client.post("/agents/vm-gone/drain")
        assert gone.status_code == 502
        assert gone.json()["error"].startswith("agent vm-gone could not be told to drain: ")
        assert gone.json()["error"].endswith(
            "routes no new job there meanwhile, and tells the agent once it answers"
        )
        listed = agents(client)
        assert (listed["vm-gone"]["state"], listed["vm-gone"]["draining"]) == ("draining", True)
        assert listed["vm-gone"]["last_contact_at"] is None and listed["vm-gone"]["max_jobs"] is None
        # b drained too: vm-a is the only one left for the first two jobs.
        assert client.post("/agents/vm-b/drain").json()["draining"] is True
        body = {"command": "sleep 2", "dag_id": "d", "run_id": "r", "try_number": 1, "labels": ["batch"]}
        short = client.post("/jobs", json={**body, "task_id": "short"}).json()
        long = client.post("/jobs", json={**body, "task_id": "long", "command": "sleep 120"}).json()
        assert (short["agent_id"], long["agent_id"]) == ("vm-a", "vm-a")
        assert client.post("/agents/vm-b/undrain").json()["draining"] is False

        drained = client.post("/agents/vm-a/drain")
        assert drained.status_code == 200
        entry = drained.json()
        assert set(entry) == ENTRY_KEYS
        assert (entry["agent_id"], entry["url"], entry["labels"]) == ("vm-a", a.url, ["batch"])
        assert (entry["state"], entry["draining"], entry["max_jobs"], entry["active_jobs"]) == (
            "draining",
            True,
            4,
            2,
        )
        assert entry["jobs_running"] == 2 and isinstance(entry["version"], str)
        assert datetime.fromisoformat(entry["last_contact_at"]).tzinfo is not None
        with httpx.Client(base_url=a.url) as direct:  # the agent keeps the flag itself
            assert direct.get("/healthz").json()["draining"] is True

        later = {**body, "command": "sleep 60"}
        placed = [client.post("/jobs", json={**later, "task_id": f"after-{n}"}).json() for n in range(4)]
        assert {p["agent_id"] for p in placed} == {"vm-b"}  # not the drained one, not the gone one
        wait_for(lambda: job(client, short["job_id"])["status"] == "SUCCEEDED", "the short job's end")
        airflow.mark(("d", "r", "long", -1), "failed")  # a person marks the task failed
        stopped = wait_for(lambda: (j := job(client, long["job_id"]))["status"] == "FAILED" and j, "the stop")
        assert stopped["rc"] is not None and "failed" in stopped["reason"]

        listed = agents(client)
        assert {k: (v["state"], v["active_jobs"]) for k, v in listed.items()} == {
            "vm-a": ("draining", 0),
            "vm-b": ("live", 4),
            "vm-gone": ("draining", 0),
        }
        wait_for(lambda: agents(client)["vm-a"]["jobs_running"] == 0, "vm-a idle, as its health says")
        metrics = client.get("/metrics").text
        assert 'reconciler_agents{state="draining"} 2.0' in metrics
        assert 'reconciler_agents{state="live"} 1.0' in metrics

        back = client.post("/agents/vm-a/undrain")
        assert (back.status_code, back.json()["state"], back.json()["draining"]) == (200, "live", False)
        client.post("/agents/vm-b/drain")  # vm-b has no limit: it would win any choice
        assert client.post("/jobs", json={**later, "task_id": "back"}).json()["agent_id"] == "vm-a"

        unknown = client.post("/agents/vm-nope/drain")
        assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown agent 'vm-nope'")
        assert stranger.get("/agents").status_code == 401
        assert stranger.post("/agents/vm-a/drain").status_code == 401
        assert agents(client)["vm-a"]["draining"] is False  # the refused request changed nothing
