"""Version skew: an agent older than the sidecar works with gets no new job, and is reported.

A real agent (it says this package's version) and a real sidecar whose ``[fleet] min_agent_version``
is above it: the agent is shown ``outdated``, counted in ``reconciler_agents{state="outdated"}``, and
a job routed by its labels is not sent there; the sidecar restarted without that floor routes to it
again. The comparison itself, and a floor that is no version, are pinned in process.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from reconciler.config import parse_config
from reconciler.fleet.versions import LOWEST_AGENT_VERSION, minimum, release, too_old
from servicekit.config import ConfigError


@pytest.mark.fast
def test_versions_compare_by_their_release_numbers() -> None:
    assert release("1.2.10") == (1, 2, 10) and release("1.2.0") == (1, 2) and release("v2") == (2,)
    assert release("1.3.0rc1") == (1, 3) and release("0.1.0+local") == (0, 1)
    assert release("0+unknown") is None and release("stand-in") is None and release("") is None
    assert too_old("1.2.9", "1.2.10") and not too_old("1.2.10", "1.2.9") and not too_old("1.2", "1.2.0")
    # Not judged: nothing is known to be wrong with an agent that says no release.
    assert not too_old(None, "9.0") and not too_old("0+unknown", "9.0") and not too_old("dev", "9.0")
    assert minimum("") == LOWEST_AGENT_VERSION and minimum("0.0.1") == LOWEST_AGENT_VERSION
    assert minimum("7.1") == "7.1"


@pytest.mark.fast
def test_a_floor_that_is_no_version_is_refused_at_start() -> None:
    base = {"airflow": {"base_url": "http://127.0.0.1:1"}}
    with pytest.raises(ConfigError, match=r"\[fleet\] min_agent_version: 'latest' is no version"):
        parse_config({**base, "fleet": {"min_agent_version": "latest"}}, {})
    assert (
        parse_config({**base, "fleet": {"min_agent_version": "0.3.1"}}, {}).fleet.min_agent_version == "0.3.1"
    )


def test_an_outdated_agent_gets_no_new_job_until_the_floor_allows_it(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    agent = AgentProcess(tmp_path / "vm", agent_id="vm-old")

    def sidecar(floor: str) -> SidecarProcess:
        return SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            api_version="v2",
            agents=[AgentRef("vm-old", agent.url, agent.token, labels=["pool"])],
            interval_seconds=1.0,
            extra_config=f'[fleet]\nmin_agent_version = "{floor}"\n',
        )

    def submit(client: httpx.Client, task: str) -> httpx.Response:
        airflow.call_soon(airflow.standin.add, "v", "r", task, -1, "running", 1)
        body = {"command": "true", "labels": ["pool"], "dag_id": "v", "task_id": task, "run_id": "r",
                "map_index": -1, "try_number": 1}  # fmt: skip
        return client.post("/jobs", json=body)

    with agent:
        with sidecar("99.0") as old_floor, old_floor.client() as client:
            listed = wait_for(
                lambda: (a := client.get("/agents").json()["agents"][0])["state"] == "outdated" and a,
                "vm-old shown outdated",
                20,
            )
            assert listed["version"] and too_old(listed["version"], "99.0"), listed
            wait_for(
                lambda: 'reconciler_agents{state="outdated"} 1.0' in client.get("/metrics").text,
                "the gauge counts it",
                10,
            )
            refused = submit(client, "t1")
            assert refused.status_code == 503 and "vm-old" in refused.text, refused.text
            assert (
                "says version" in old_floor.log_path.read_text() and "99.0" in old_floor.log_path.read_text()
            )
        with sidecar("") as new_floor, new_floor.client() as client:
            wait_for(lambda: client.get("/agents").json()["agents"][0]["state"] == "live", "vm-old live", 20)
            placed = submit(client, "t2")
            assert placed.status_code == 201 and placed.json()["agent_id"] == "vm-old", placed.text
