"""``check-config --connect`` reaches Airflow, the router DB and every agent with the configured
credentials, and says which fails and why (never a secret): a real agent, the Airflow stand-in. Agents
that registered themselves (the router DB's ``agents`` table) are tried with the call token their
heartbeats carry, as the sidecar calls them; when they cannot be tried, a line says so."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(home=tmp_path_factory.mktemp("check") / "agent", agent_id="agent-1") as proc:
        yield proc


@pytest.fixture(scope="module")
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    served.start()
    yield served
    served.stop()


def check(sidecar: SidecarProcess, **env: str | None) -> subprocess.CompletedProcess[str]:
    """``check-config --connect`` with the sidecar's configuration and environment (``env`` changes
    it: None removes a variable)."""
    config = sidecar.write_config()
    environ = sidecar.env()
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "check-config", "--connect", "--config", str(config)],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_everything_reachable_is_ok(agent: AgentProcess, airflow: ServedAirflow, tmp_path: Path) -> None:
    sidecar = SidecarProcess(
        workdir=tmp_path, airflow_url=airflow.url, airflow_password="pw", api_version="v2",
        agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
    )  # fmt: skip
    done = check(sidecar)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith(f"ok    Airflow at {airflow.url}: REST API v2")
    assert lines[2].startswith("ok    router DB sqlite:///") and "schema at revision" in lines[2]
    assert lines[3] == f"ok    agent agent-1 at {agent.url}: answers, and takes this sidecar's token"


def test_each_failure_is_named_and_no_secret_is_shown(agent: AgentProcess, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    sidecar = SidecarProcess(
        workdir=tmp_path, airflow_url=dead, airflow_password="airflow-secret-pw", api_version="v2",
        agents=[
            AgentRef("agent-1", agent.url, "a-wrong-token-xyz", labels=["default"]),
            AgentRef("vm-other", agent.url, agent.token, labels=["default"]),
            AgentRef("agent-gone", dead, agent.token, labels=["default"]),
        ],
    )  # fmt: skip
    done = check(sidecar)
    assert done.returncode == 1
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert [line.split(": ")[0] for line in failed] == [
        f"FAIL  Airflow at {dead}",
        f"FAIL  agent agent-1 at {agent.url}",
        f"FAIL  agent vm-other at {agent.url}",
        f"FAIL  agent agent-gone at {dead}",
    ]
    assert "refused this sidecar's token" in failed[1] and "calls itself 'agent-1'" in failed[2]
    for secret in ("airflow-secret-pw", "a-wrong-token-xyz", agent.token):
        assert secret not in done.stdout + done.stderr


FLEET_TOKEN = "fleet-token-for-check"


def test_registered_agents_are_tried_with_their_own_call_token(
    agent: AgentProcess, airflow: ServedAirflow, tmp_path: Path
) -> None:
    """A real agent registers itself (ROUTER_URL, SELF_URL, AGENT_ID, the fleet token) with a real
    sidecar; check-config --connect with that sidecar's configuration tries it as the sidecar does,
    beside the configured agent-1, and says so when it cannot."""
    sidecar = SidecarProcess(
        workdir=tmp_path / "sidecar", airflow_url=airflow.url, airflow_password="pw", api_version="v2",
        agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])], fleet_token=FLEET_TOKEN,
        extra_config="[fleet]\nlost_after_seconds = 60\n",
    )  # fmt: skip
    port = free_port()
    registered = AgentProcess(
        tmp_path / "pool-1", agent_id="pool-1", port=port, token=FLEET_TOKEN, accepted_tokens=[],
        extra_config='heartbeat_seconds = 0.5\nlabels = ["pool"]\n',
        extra_env={"ROUTER_URL": sidecar.url, "SELF_URL": f"http://127.0.0.1:{port}", "AGENT_ID": "pool-1",
                   "AGENTIC_FLEET_TOKEN": FLEET_TOKEN, "AGENTIC_AGENT_TOKEN": ""},
    )  # fmt: skip
    with sidecar, registered, sidecar.client() as client:
        wait_for(
            lambda: any(a["agent_id"] == "pool-1" for a in client.get("/agents").json()["agents"]),
            "pool-1 registered",
            30,
        )
        done = check(sidecar)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        pool = f"registered agent pool-1 at {registered.url}"
        assert lines[3] == f"ok    agent agent-1 at {agent.url}: answers, and takes this sidecar's token"
        assert lines[4] == f"ok    {pool}: answers, and takes its registration's token"

        # The fleet token only registers: another one here changes nothing for a registered agent.
        wrong = check(sidecar, AGENTIC_FLEET_TOKEN="not-the-fleet-token")
        assert wrong.returncode == 0 and f"ok    {pool}: answers" in wrong.stdout, wrong.stdout

        # Without the fleet token the sidecar still calls registered agents, with their own tokens.
        off = check(sidecar, AGENTIC_FLEET_TOKEN=None)
        assert off.returncode == 0 and f"ok    {pool}: answers" in off.stdout, off.stdout

        registered.kill()  # a lost VM: its row stays in the router DB
        gone = check(sidecar)
        assert gone.returncode == 1
        [failed] = [line for line in gone.stdout.splitlines() if line.startswith("FAIL")]
        assert failed.startswith(f"FAIL  {pool}: ")
        assert "last heartbeat " in failed
        for done in (wrong, off, gone):
            for secret in (FLEET_TOKEN, "not-the-fleet-token", agent.token):
                assert secret not in done.stdout + done.stderr


def test_registered_agents_not_checked_when_the_router_db_cannot_be_read(
    agent: AgentProcess, airflow: ServedAirflow, tmp_path: Path
) -> None:
    sidecar = SidecarProcess(
        workdir=tmp_path, airflow_url=airflow.url, airflow_password="pw", api_version="v2",
        agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])], fleet_token=FLEET_TOKEN,
        db_url=f"sqlite:///{tmp_path / 'no-such-directory' / 'router.db'}",
    )  # fmt: skip
    done = check(sidecar)
    assert done.returncode == 1
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert [line.split(": ")[0] for line in failed] == [
        "FAIL  router DB sqlite:///" + str(tmp_path / "no-such-directory" / "router.db"),
        "FAIL  registered agents",
    ]
    assert "not checked" in failed[1] and "router DB" in failed[1]
    assert FLEET_TOKEN not in done.stdout + done.stderr
