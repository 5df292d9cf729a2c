"""No secret reaches a log: a small end-to-end run with distinctive secrets, failures included, then
every file the run produced (agent log, sidecar log, job directories, router DB) is searched for each.

Airflow is a stand-in that refuses the login (so the password is sent, refused and the refusal
logged, every cycle); one agent entry carries a wrong token (so the agent refuses the sidecar);
clients send wrong tokens to both services; a job prints its whole environment."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess


class RefusingAirflow:
    """Answers every login with 401 and counts the attempts; never echoes what it was sent."""

    def __init__(self) -> None:
        self.logins = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.logins += self.path == "/auth/token"
                self._reply(401, {"detail": "Invalid credentials"})

            def do_GET(self) -> None:
                self._reply(401, {"detail": "Not authenticated"})

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> RefusingAirflow:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def secret_values() -> dict[str, str]:
    return {
        name: f"{name}-{secrets.token_hex(12)}"
        for name in ("agenttoken", "wrongagenttoken", "sidecartoken", "airflowpw")
    }


def submission(task_id: str, command: str, labels: list[str]) -> dict[str, Any]:
    return {
        "command": command,
        "labels": labels,
        "dag_id": "secrets",
        "task_id": task_id,
        "run_id": "r",
        "try_number": 1,
    }


def test_no_secret_appears_in_any_file_the_run_produced(
    tmp_path: Path, secret_values: dict[str, str]
) -> None:
    agent_token, wrong_agent_token = secret_values["agenttoken"], secret_values["wrongagenttoken"]
    sidecar_token, password = secret_values["sidecartoken"], secret_values["airflowpw"]
    with (
        RefusingAirflow() as airflow,
        AgentProcess(home=tmp_path / "agent", agent_id="agent-1", token=agent_token) as agent,
        # An agent of its own: the sidecar sends nothing to a URL where another agent answers.
        AgentProcess(home=tmp_path / "other", agent_id="agent-wrong", token=agent_token) as other,
        SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password=password,
            api_version="v2",
            agents=[
                AgentRef("agent-1", agent.url, agent_token, labels=["good"]),
                AgentRef("agent-wrong", other.url, wrong_agent_token, labels=["wrong"]),
            ],
            interval_seconds=0.2,
            token=sidecar_token,
        ) as sidecar,
        sidecar.client() as api,
    ):
        ok = api.post("/jobs", json=submission("env", "env; echo done", ["good"]))
        assert ok.status_code == 201, ok.text
        refused = api.post("/jobs", json=submission("refused", "true", ["wrong"]))
        assert refused.status_code == 201 and refused.json()["status"] != "RUNNING", refused.text
        for token in (sidecar_token + "x", sidecar_token[:-1], "nope"):
            headers = {"Authorization": f"Bearer {token}"}
            assert httpx.get(f"{sidecar.url}/jobs", headers=headers, timeout=10).status_code == 401
        for token in (agent_token + "x", wrong_agent_token):
            for headers in ({"Authorization": f"Bearer {token}"}, {"X-Agent-Token": token}):
                assert httpx.get(f"{agent.url}/jobs/x", headers=headers, timeout=10).status_code == 401
        api.post(
            "/jobs/update_status", json={"job_id": ok.json()["job_id"], "status": "failed"}
        )  # 503: no Airflow
        api.get(f"/jobs/{refused.json()['job_id']}/log")
        deadline = time.monotonic() + 15
        while api.get(f"/jobs/{ok.json()['job_id']}").json()["status"] != "SUCCEEDED":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while airflow.logins < 3:  # several refused logins, each logged
            assert time.monotonic() < deadline
            time.sleep(0.1)
    # Both processes are stopped: their logs are complete.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"sidecar.log", "agent-agent.log", "output.log"} <= names, sorted(names)
    job_output = next(p for p in files if p.name == "output.log" and "done" in p.read_text(errors="replace"))
    assert "PATH=" in job_output.read_text()  # the job really printed its environment
    sidecar_log = (tmp_path / "sidecar" / "sidecar.log").read_text(errors="replace")
    assert "401" in sidecar_log or "auth" in sidecar_log.lower(), "the refused Airflow login was not logged"
    for path in files:
        content = path.read_bytes()
        for name, value in secret_values.items():
            assert value.encode() not in content, f"{name} found in {path.relative_to(tmp_path)}"
    assert len(files) >= 5
