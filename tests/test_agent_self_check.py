"""Automatic maintenance: an agent whose disk is nearly full takes no new job until it recovers.

Real processes: an agent whose ``min_free_disk_bytes`` no disk here meets (1 EiB) refuses ``/run``
with the reason (503), says it in ``/healthz`` and ``/readyz``, and the sidecar routes a job by labels
to the other agent and shows the reason as the agent's maintenance; restarted with a bound the disk
meets, it takes jobs again. The check's recovery while the agent runs is pinned in process, with the
disk's free space stepped under and over the bound (the fast tier).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from agent.admission import Admission
from agent.errors import JobRejected
from agent.self_check import SelfCheck, problems
from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

EXBIBYTE = 2**60


@pytest.mark.fast
def test_problems_name_the_bound_and_the_home(tmp_path: Path) -> None:
    found = problems(home=tmp_path, free_bytes=100 * 2**20, min_free_bytes=256 * 2**20, write_error=None)
    assert list(found) == ["disk_full"]
    assert "100.0 MiB free, under [agent] min_free_disk_bytes 256.0 MiB" in found["disk_full"]
    assert str(tmp_path) in found["disk_full"]
    assert problems(home=tmp_path, free_bytes=1, min_free_bytes=0, write_error=None) == {}  # no disk check
    said = problems(home=tmp_path, free_bytes=None, min_free_bytes=1, write_error="Read-only file system")
    assert list(said) == ["not_writable"] and "Read-only file system" in said["not_writable"]


@pytest.mark.fast
def test_an_agent_takes_jobs_again_once_its_disk_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = [10 * 2**20]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free[0]))
    admission = Admission(agent_id="vm", max_jobs=0, home=tmp_path)
    told: list[Any] = []

    def changed(unwell: Any) -> None:
        told.append(unwell)
        admission.set_unwell(unwell)

    check = SelfCheck(tmp_path, min_free_bytes=2**30, changed=changed)

    async def steps() -> None:
        await check.check()
        with pytest.raises(JobRejected) as refused:
            admission.check(running=0)
        assert refused.value.status == 503 and "nearly full" in str(refused.value)
        free[0] = 20 * 2**20
        await check.check()  # the figures change, not what is wrong: nobody is told again
        assert len(told) == 1 and check.unwell is not None and "20.0 MiB free" in check.unwell.reason
        free[0] = 2 * 2**30
        await check.check()
        admission.check(running=0)  # takes jobs again

    asyncio.run(steps())
    assert [t is None for t in told] == [False, True]


def test_a_nearly_full_disk_sends_jobs_elsewhere_and_says_why(tmp_path: Path, airflow: ServedAirflow) -> None:
    full = AgentProcess(
        tmp_path / "full", agent_id="vm-full", extra_config=f"min_free_disk_bytes = {EXBIBYTE}\n"
    )
    roomy = AgentProcess(tmp_path / "roomy", agent_id="vm-roomy")
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        api_version="v2",
        agents=[AgentRef(a.agent_id, a.url, a.token, labels=["pool"]) for a in (full, roomy)],
        interval_seconds=1.0,
    )
    with full, roomy, sidecar, sidecar.client() as client:
        auth = {"Authorization": f"Bearer {full.token}"}
        health = httpx.get(f"{full.url}/healthz", timeout=10).json()
        assert "nearly full" in health["unwell"]["reason"], health
        assert health["draining"] is False  # its own maintenance, not an operator's drain
        ready = httpx.get(f"{full.url}/readyz", timeout=10)
        assert ready.status_code == 503 and "nearly full" in " ".join(ready.json()["problems"])
        run = httpx.post(
            f"{full.url}/run", json={"job_id": "j-1", "payload": {"command": "true"}}, headers=auth
        )
        assert run.status_code == 503 and "until it recovers" in run.json()["error"], run.text

        def shown() -> dict[str, Any] | None:
            agents = {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}
            agent = agents["vm-full"]
            return dict(agent) if agent["maintenance"] is not None else None

        agent = wait_for(shown, "the sidecar shows why", 20)
        assert agent["state"] == "draining" and "nearly full" in agent["maintenance"]["comment"], agent
        assert agent["maintenance"]["by"].startswith("the agent itself"), agent
        gauge = 'reconciler_agents_in_maintenance{by="agent"} 1.0'
        wait_for(lambda: gauge in client.get("/metrics").text, "the gauge counts it", 10)
        for index in range(3):  # each goes to the agent that has room
            airflow.call_soon(airflow.standin.add, "sc", "r", f"t{index}", -1, "running", 1)
            body = {"command": "true", "labels": ["pool"], "dag_id": "sc", "task_id": f"t{index}",
                        "run_id": "r", "map_index": -1, "try_number": 1}  # fmt: skip
            placed = client.post("/jobs", json=body)
            assert placed.status_code == 201 and placed.json()["agent_id"] == "vm-roomy", placed.text

        full.stop()
        full.extra_config = "min_free_disk_bytes = 1\n"  # restarted with a bound the disk meets
        full.start()
        assert httpx.get(f"{full.url}/healthz", timeout=10).json()["unwell"] is None
        wait_for(lambda: shown() is None, "the sidecar routes to it again", 20)
