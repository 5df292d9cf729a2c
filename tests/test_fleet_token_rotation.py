"""Rotating the fleet token in the order docs/troubleshooting.md gives, with real processes.

The fleet token is a bootstrap token: an agent presents the first of its fleet tokens when a start
registers it, and the sidecar accepts all of its own; afterwards the agent speaks with its credential
and the sidecar calls it with a token derived from it. The steps are read from the guide (so a
reworded or reordered guide fails here), checked against that model, then walked with a real sidecar
and a real registered agent whose token files are replaced, the agent restarted after each step (a
registration each time): heartbeats are accepted, the agent stays live, and the sidecar starts and
stops a job on it. At the end the old token registers nothing, and no fleet token opens the agent.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_api.registration import Heartbeat
from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow
from harness.sidecar import SidecarProcess

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "troubleshooting.md"
SECTION = "### Rotating the fleet token"
# "1. sidecar `old,new`: ..." : who changes, and the tokens its file then holds, in order
STEP = re.compile(r"^(\d)\. (sidecar|agents) `([a-z]+(?:,[a-z]+)*)`:", re.MULTILINE)
OLD, NEW = "fleet-old-5t8k2w7q", "fleet-new-3m6x9b1r"
AGENT_ID = "vm-rot"
TASKS = ("start", "step-1", "step-2", "step-3")
RELOAD_WITHIN = 5.0  # token files are looked at every second
# [leader] lease_seconds must be below [fleet] lost_after_seconds (docs/configuration.md).
FLEET = (
    "[leader]\nlease_seconds = 5.0\n"
    "[fleet]\nlost_after_seconds = 6.0\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
)

Step = tuple[str, tuple[str, ...]]


def documented_steps() -> list[Step]:
    text = GUIDE.read_text(encoding="utf-8")
    assert SECTION in text, f"docs/troubleshooting.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n#", 1)[0]
    return [(who, tuple(tokens.split(","))) for _, who, tokens in STEP.findall(body)]


@pytest.mark.fast
def test_the_guide_gives_an_order_in_which_both_directions_keep_working() -> None:
    """Each step changes one side, one process at a time: while some agents have taken a step and
    others not, the token any agent would register with is accepted by the sidecar. The old token is
    gone from both at the end."""
    steps = documented_steps()
    assert [who for who, _ in steps] == ["sidecar", "agents", "sidecar"], steps
    sidecar: tuple[str, ...] = ("old",)
    agents: tuple[str, ...] = ("old",)
    for n, (who, tokens) in enumerate(steps, 1):
        before = agents
        if who == "sidecar":
            sidecar = tokens
        else:
            agents = tokens
        for agent in {before, agents}:  # a fleet half-way through the step
            assert agent[0] in sidecar, f"step {n}: the sidecar refuses registrations ({sidecar}, {agent})"
    assert sidecar == agents == ("new",)


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    for task in TASKS:
        served.standin.add("fleet", "r", task, -1, state="deferred", try_number=1)
    served.start()
    yield served
    served.stop()


def replace(path: Path, tokens: list[str]) -> None:
    """Write the tokens one per line as a new file renamed over the old (what the guide asks)."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    os.replace(fresh, path)


def reloads(log: Path, file: Path) -> int:
    return log.read_text(encoding="utf-8", errors="replace").count(f"reloaded from {file}")


def reloaded(log: Path, file: Path, before: int) -> bool:
    return reloads(log, file) > before


def heartbeat_at(agent: AgentProcess) -> tuple[Any, Any]:
    registration = httpx.get(f"{agent.url}/healthz", timeout=5).json()["registration"]
    return registration["last_heartbeat_at"], registration["last_error"]


def refused_heartbeats(sidecar: SidecarProcess) -> float:
    text = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    found = re.search(r'^reconciler_agent_heartbeats_total\{result="refused"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def both_ways(
    client: httpx.Client, sidecar: SidecarProcess, agent: AgentProcess, airflow: ServedAirflow, task: str
) -> None:
    """Heartbeats are accepted, the agent is live, and the sidecar starts a job there and stops it."""
    seen = {heartbeat_at(agent)[0]}

    def two_more() -> bool:
        seen.add(heartbeat_at(agent)[0])
        return len(seen) >= 3

    wait_for(two_more, f"{task}: two new heartbeats accepted", 10)
    assert heartbeat_at(agent)[1] is None, f"{task}: {heartbeat_at(agent)[1]}"
    assert refused_heartbeats(sidecar) == 0
    assert agent_state(client) == "live"

    body = {"command": "sleep 600", "agent_id": AGENT_ID, "dag_id": "fleet", "task_id": task}
    answer = client.post("/jobs", json={**body, "run_id": "r", "try_number": 1})
    assert answer.status_code == 201 and answer.json()["status"] == "RUNNING", f"{task}: {answer.text}"
    job = answer.json()["job_id"]
    airflow.mark(("fleet", "r", task, -1), "failed")
    ended = wait_for(
        lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "FAILED" and j, f"{task}: stopped", 20
    )
    assert ended["rc"] == -15, f"{task}: {ended}"  # the agent took the stop: SIGTERM ended it


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def agent_state(client: httpx.Client) -> str:
    listed = {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}
    return str(listed.get(AGENT_ID, {}).get("state", "absent"))


def test_the_documented_rotation_keeps_a_registered_agent_working_and_retires_the_old_token(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    steps = documented_steps()
    token = {"old": OLD, "new": NEW}
    sidecar_file, agent_file = tmp_path / "sidecar-fleet-token", tmp_path / "agent-fleet-token"
    replace(sidecar_file, [OLD])
    replace(agent_file, [OLD])
    port = free_port()
    with ExitStack() as stack:
        sidecar = stack.enter_context(
            SidecarProcess(
                workdir=tmp_path / "sidecar",
                airflow_url=airflow.url,
                airflow_password="unused",
                agents=[],
                api_version="v2",
                interval_seconds=0.3,
                extra_config=FLEET + f'registration_token_file = "{sidecar_file}"\n',
            )
        )
        client = stack.enter_context(sidecar.client())
        agent = stack.enter_context(
            AgentProcess(
                tmp_path / "agent",
                agent_id=AGENT_ID,
                port=port,
                accepted_tokens=[],  # no token of its own: the sidecar calls it with its call token
                extra_config=f'heartbeat_seconds = 0.5\nrouter_token_file = "{agent_file}"\n',
                extra_env={"ROUTER_URL": sidecar.url, "SELF_URL": f"http://127.0.0.1:{port}"},
            )
        )
        wait_for(lambda: agent_state(client) == "live", "the agent registered", 15)
        both_ways(client, sidecar, agent, airflow, "start")

        for n, (who, names) in enumerate(steps, 1):
            file, log = (sidecar_file, sidecar.log_path) if who == "sidecar" else (agent_file, agent.log_path)
            before = reloads(log, file)
            replace(file, [token[name] for name in names])
            wait_for(partial(reloaded, log, file, before), f"step {n}: {who} read its file", RELOAD_WITHIN)
            if who == "agents":  # its next start registers with the token its file holds now
                agent.stop()
                agent.start()
                wait_for(lambda: heartbeat_at(agent)[0] is not None, f"step {n}: registered again", 15)
            both_ways(client, sidecar, agent, airflow, f"step-{n}")

        # The old token registers nothing any more; no fleet token opens the agent; its call token does.
        beat = Heartbeat(url=agent.url, instance="someone-else").to_json()
        put = f"{sidecar.url}/agents/{AGENT_ID}"
        assert httpx.put(put, json=beat, headers=bearer(OLD), timeout=5).status_code == 401
        assert httpx.put(put, json={}, headers=bearer(NEW), timeout=5).status_code == 400
        job = f"{agent.url}/jobs/no-such-job"
        assert httpx.get(job, headers=bearer(OLD), timeout=5).status_code == 401
        assert httpx.get(job, headers=bearer(NEW), timeout=5).status_code == 401
        assert httpx.get(job, headers=bearer(agent.call_token()), timeout=5).status_code == 404
        time.sleep(1.0)  # a heartbeat or two more: still accepted
        assert heartbeat_at(agent)[1] is None and agent_state(client) == "live"
        logs = sidecar.log_path.read_text(encoding="utf-8") + agent.log_text()
        assert OLD not in logs and NEW not in logs
