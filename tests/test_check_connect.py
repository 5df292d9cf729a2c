"""``check-config --connect`` reaches Airflow, the router DB and every agent with the configured
credentials, and says which fails and why (never a secret): a real agent, the Airflow stand-in."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agent import AgentProcess
from harness.processes import free_port
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


def check(sidecar: SidecarProcess) -> subprocess.CompletedProcess[str]:
    config = sidecar.write_config()
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "check-config", "--connect", "--config", str(config)],
        cwd=ROOT, env=sidecar.env(), capture_output=True, text=True, timeout=60, check=False,
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
