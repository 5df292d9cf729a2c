"""Token files rotated while a sidecar and an agent run: no restart, no stop lost or held up.

Real processes: an agent reading its tokens from a file edited in place (a VM), and a sidecar reading
its API tokens and its token for the agent from files mounted as Kubernetes mounts a Secret (the
key is a link through ``..data``, which an update swaps atomically). Airflow is the REST stand-in;
tasks are marked failed around each step, so stops are pending while the tokens change. The steps
are the documented ones (docs/troubleshooting.md): add the new token to the agent's file next to the
old one; replace the sidecar's token for the agent; remove the old one from the agent's file; and
likewise for the sidecar's own API tokens, which clients send.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.agent import AgentProcess
from harness.processes import wait_until
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

AGENT_OLD, AGENT_NEW = "agent-old-7f3k2m9q", "agent-new-4h8w1z6v"
API_OLD, API_NEW = "api-old-2p5r8t1y", "api-new-9c3v6b0n"
TASKS = ("before", "switching", "after", "api")
INTERVAL = 0.5  # the sidecar's poll interval
STOP_WITHIN = 4.0  # seconds from a mark to the job's end: a cycle, the confirmation, one retry at most
RELOAD_WITHIN = 5.0  # files are looked at every second


class MountedSecret:
    """A file as Kubernetes mounts a Secret key: ``<name>`` -> ``..data/<name>``, ``..data`` ->
    ``..v<n>/``; an update writes a new ``..v<n+1>/`` and swaps ``..data`` with one rename."""

    def __init__(self, directory: Path, name: str, text: str) -> None:
        self.directory, self.name, self.version = directory, name, 0
        directory.mkdir(parents=True)
        self._write(text)
        (directory / name).symlink_to(Path("..data") / name)

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def _write(self, text: str) -> None:
        self.version += 1
        version = self.directory / f"..v{self.version}"
        version.mkdir()
        (version / self.name).write_text(text, encoding="utf-8")
        link = self.directory / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.directory / "..data")

    def update(self, text: str) -> None:
        old = self.directory / f"..v{self.version}"
        self._write(text)
        shutil.rmtree(old)


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    for task in TASKS:
        served.standin.add("rot", "r", task, -1, state="deferred", try_number=1)
    served.start()
    yield served
    served.stop()


def agent_answer(agent: AgentProcess, token: str) -> int:
    """401 for a token the agent refuses; 404 (no such job) once it is accepted."""
    return httpx.get(f"{agent.url}/jobs/no-such-job", headers={"X-Agent-Token": token}, timeout=5).status_code


def sidecar_answer(sidecar: SidecarProcess, token: str) -> int:
    with sidecar.client(token) as client:
        return client.get("/jobs", params={"limit": 1}).status_code


def logged(path: Path, pattern: str) -> bool:
    return re.search(pattern, path.read_text(encoding="utf-8", errors="replace")) is not None


def submit(client: httpx.Client, task: str) -> str:
    body = {"command": "sleep 600", "agent_id": "agent-1", "dag_id": "rot", "task_id": task}
    answer = client.post("/jobs", json={**body, "run_id": "r", "try_number": 1})
    assert answer.status_code == 201 and answer.json()["status"] == "RUNNING", answer.text
    return str(answer.json()["job_id"])


def metric(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_rotating_every_token_file_needs_no_restart_and_holds_up_no_stop(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    agent_file = tmp_path / "agent-tokens"
    agent_file.write_text(f"{AGENT_OLD}\n", encoding="utf-8")
    api_tokens = MountedSecret(tmp_path / "secrets-api", "token", API_OLD)
    agent_token = MountedSecret(tmp_path / "secrets-agent", "token", AGENT_OLD)
    stop_took: dict[str, float] = {}

    with AgentProcess(
        tmp_path / "agent", agent_id="agent-1", token=AGENT_OLD, token_file=agent_file
    ) as agent:
        sidecar = SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, "not-this-one", token_file=agent_token.path)],
            api_version="v2",
            interval_seconds=INTERVAL,
            token="not-this-one-either",
            token_file=api_tokens.path,
        )
        with sidecar, sidecar.client(API_OLD) as client:
            assert sidecar.proc is not None
            pids = (agent.pid, sidecar.proc.pid)
            jobs = {task: submit(client, task) for task in TASKS[:3]}

            def mark_failed(task: str) -> float:
                airflow.mark(("rot", "r", task, -1), "failed")
                return time.monotonic()

            def wait_stopped(task: str, marked: float, api: httpx.Client = client) -> None:
                def ended() -> bool:
                    return bool(api.get(f"/jobs/{jobs[task]}").json()["status"] == "FAILED")

                wait_until(ended, timeout=15, what=f"job {task} stopped", interval=0.05)
                stop_took[task] = time.monotonic() - marked

            # 1. The agent's file gets the new token next to the old one; a stop is under way.
            marked = mark_failed("before")
            agent_file.write_text(f"{AGENT_OLD}\n{AGENT_NEW}\n", encoding="utf-8")
            wait_until(
                lambda: agent_answer(agent, AGENT_NEW) == 404,
                timeout=RELOAD_WITHIN,
                what="agent took the new",
            )
            assert agent_answer(agent, AGENT_OLD) == 404
            wait_stopped("before", marked)

            # 2. The sidecar's token for the agent is replaced, with a stop issued at that moment.
            marked = mark_failed("switching")
            agent_token.update(AGENT_NEW)
            wait_stopped("switching", marked)
            wait_until(
                lambda: logged(
                    sidecar.log_path,
                    "agent 'agent-1' token: reloaded from " + re.escape(str(agent_token.path)),
                ),
                timeout=RELOAD_WITHIN,
                what="the sidecar's reload of its token for the agent",
            )

            # 3. The old token leaves the agent's file; the next stop goes through with the new one.
            agent_file.write_text(f"{AGENT_NEW}\n", encoding="utf-8")
            wait_until(
                lambda: agent_answer(agent, AGENT_OLD) == 401,
                timeout=RELOAD_WITHIN,
                what="agent dropped the old",
            )
            wait_stopped("after", mark_failed("after"))

            # The sidecar's API tokens, the same way: both, then clients move, then only the new one.
            api_tokens.update(f"{API_OLD}\n{API_NEW}\n")
            wait_until(lambda: sidecar_answer(sidecar, API_NEW) == 200, timeout=RELOAD_WITHIN, what="API new")
            assert sidecar_answer(sidecar, API_OLD) == 200
            with sidecar.client(API_NEW) as moved:
                jobs["api"] = submit(moved, "api")
                api_tokens.update(API_NEW)
                wait_until(
                    lambda: sidecar_answer(sidecar, API_OLD) == 401,
                    timeout=RELOAD_WITHIN,
                    what="API old gone",
                )
                wait_stopped("api", mark_failed("api"), moved)

                # SIGHUP reads the files again at once, and ends neither service (its default would).
                os.kill(agent.pid, signal.SIGHUP)
                os.kill(sidecar.proc.pid, signal.SIGHUP)
                wait_until(
                    lambda: (
                        logged(agent.log_path, "SIGHUP: reading 1 secret file")
                        and logged(sidecar.log_path, "SIGHUP: reading 2 secret file")
                    ),
                    timeout=RELOAD_WITHIN,
                    what="both services re-read their token files on SIGHUP",
                )
                assert sidecar_answer(sidecar, API_NEW) == 200 and agent_answer(agent, AGENT_NEW) == 404

            # No restart, and no stop refused or retried on the agent's side.
            assert (agent.pid, sidecar.proc.pid) == pids
            assert agent.process.poll() is None and sidecar.proc.poll() is None
            assert metric(sidecar, "reconciler_stop_requests_total", outcome="stopped") == len(TASKS)
            assert metric(sidecar, "reconciler_stop_requests_total", outcome="rejected") == 0
            sidecar_log, agent_log = sidecar.log_path.read_text(), agent.log_text()

    assert all(took <= STOP_WITHIN for took in stop_took.values()), stop_took
    assert sidecar_log.count("sidecar listening on") == 1 and agent_log.count("listening on") == 1
    assert f"[agent] token: reloaded from {agent_file}" in agent_log
    assert f"[http] token: reloaded from {api_tokens.path}" in sidecar_log
    for token in (AGENT_OLD, AGENT_NEW, API_OLD, API_NEW):
        assert token not in sidecar_log and token not in agent_log
