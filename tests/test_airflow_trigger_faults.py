"""Deferred tasks on a real Airflow 3.3.2 outlive a sidecar that is down, rate-limits them or refuses
their token: the trigger waits and retries, and only the job's end or a person's action ends a task.

The stack (Airflow, one agent, the sidecar) runs as processes; three ``AgenticRunOperator`` tasks
(tests/dags/agentic_trigger_faults.py) defer on ``sleep 600`` jobs and poll every second. The sidecar
is restarted on the same port and router DB: first rate-limited (most polls get 429 with
``Retry-After``), then accepting only another token (every poll gets 401), then as it was. Every wait
is bounded. A second test runs the trigger itself in the Airflow venvs (3.3.2 and 2.11.2): its
serialized form round-trips, old kwargs still construct it, and ``run()`` outlasts 429/401/HTML 404.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from harness.agent import AgentProcess
from harness.airflow import (
    AIRFLOW_2_VERSION,
    AIRFLOW_VERSION,
    PASSWORD,
    AirflowAPI,
    AirflowServer,
    airflow_with_sidecar,
    ensure_venv,
)
from harness.processes import alive, process_group, wait_until
from harness.sidecar import AgentRef, SidecarProcess

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parent.parent
DAGS = Path(__file__).parent / "dags"
DAG_ID, RUN_ID = "trigger_faults", "faults"
TASKS = ("marked", "ended", "kept")  # as in tests/dags/agentic_trigger_faults.py
CONN_ID = "agentic_run_default"
STOP_BUDGET = 6.0  # mark failed -> the reconciler (1 s cycles) has the job's process group gone
RATE_LIMITED_SECONDS = 10.0
REFUSED_SECONDS = 20.0
# After ~35 s of faults a trigger's backoff may be ~30 s (capped at 60 s): its next poll is that far.
RESUME_BUDGET = 75.0


@dataclass
class Stack:
    airflow: AirflowServer
    api: AirflowAPI
    agent: AgentProcess
    sidecar: SidecarProcess

    def agent_job(self, job_id: str) -> dict[str, Any]:
        """The job as its agent sees it: the sidecar is not asked (its rate limit is shared)."""
        response = httpx.get(
            f"{self.agent.url}/jobs/{job_id}",
            headers={"Authorization": f"Bearer {self.agent.token}"},
            timeout=10,
        )
        response.raise_for_status()
        return dict(response.json())

    def router_job(self, job_id: str) -> dict[str, Any]:
        with self.sidecar.client() as client:
            response = client.get(f"/jobs/{job_id}")
            response.raise_for_status()
            return dict(response.json())

    def restart_sidecar(self, **settings: Any) -> None:
        """Stop the sidecar and start it again on the same port, router DB and token, with
        ``settings`` (rate limit, accepted tokens) replacing the previous ones."""
        self.sidecar.stop()
        self.sidecar.rate_limit_per_second = settings.get("rate_limit_per_second")
        self.sidecar.rate_limit_burst = settings.get("rate_limit_burst")
        self.sidecar.accepted_tokens = settings.get("accepted_tokens")
        self.sidecar.start()

    def trigger_log(self, task_id: str) -> str:
        """What the task's log shows of its trigger (Airflow 3 keeps it in ``*.trigger.*.log`` files)."""
        folder = self.airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={RUN_ID}" / f"task_id={task_id}"
        return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*trigger*")))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with AgentProcess(home=tmp_path / "agent", agent_id="agent-1", grace_seconds=2.0) as agent:
        sidecar = SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url="",  # set once Airflow's port is known
            airflow_password=PASSWORD,
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            interval_seconds=1.0,
            api_version="v2",
        )
        with airflow_with_sidecar(
            sidecar, home=tmp_path / "airflow", dags_folder=DAGS, conn_id=CONN_ID
        ) as airflow:
            api = airflow.api()
            api.wait_for_dag(DAG_ID)
            api.trigger(DAG_ID, RUN_ID)
            yield Stack(airflow, api, agent, sidecar)


def deferred_jobs(stack: Stack) -> dict[str, tuple[str, list[psutil.Process]]]:
    """Each task's job id and process group, once every task is deferred on a running job."""
    jobs: dict[str, tuple[str, list[psutil.Process]]] = {}
    for task_id in TASKS:
        stack.api.wait_for_state(DAG_ID, RUN_ID, task_id, {"deferred"}, timeout=60)
    with stack.sidecar.client() as client:
        listing = client.get("/jobs", params={"dag_id": DAG_ID, "run_id": RUN_ID})
        listing.raise_for_status()
        by_task = {job["task_id"]: job for job in listing.json()["jobs"]}
    for task_id in TASKS:
        job = by_task[task_id]
        assert job["status"] == "RUNNING", job
        pid = int(stack.agent_job(job["job_id"])["pid"])
        wait_until(lambda: bool(process_group(pid)), timeout=10, what="job started")  # noqa: B023
        jobs[task_id] = (job["job_id"], process_group(pid))
    return jobs


def hold(stack: Stack, jobs: dict[str, tuple[str, list[psutil.Process]]], seconds: float) -> None:
    """For ``seconds``: every task stays deferred, every job RUNNING on its agent with its processes."""
    deadline = time.monotonic() + seconds
    while True:
        for task_id, (job_id, tree) in jobs.items():
            ti = stack.api.task_instance(DAG_ID, RUN_ID, task_id)
            assert ti["state"] == "deferred", f"{task_id} is {ti['state']} under a sidecar fault"
            assert stack.agent_job(job_id)["status"] == "RUNNING", task_id
            assert len(alive(tree)) == len(tree), f"{task_id}'s job lost processes"
        if time.monotonic() >= deadline:
            return
        time.sleep(0.5)


def test_deferred_tasks_outlive_sidecar_restarts_rate_limits_and_refused_tokens(stack: Stack) -> None:
    jobs = deferred_jobs(stack)

    # Down, then back with a rate limit far below three triggers polling every second: mostly 429.
    stack.restart_sidecar(rate_limit_per_second=0.2, rate_limit_burst=1)
    hold(stack, jobs, RATE_LIMITED_SECONDS)

    # Back without the connection's token among those it accepts (a rotation gone wrong): all 401.
    stack.restart_sidecar(accepted_tokens=["a-token-the-connection-does-not-have"])
    hold(stack, jobs, REFUSED_SECONDS)

    stack.restart_sidecar()
    hold(stack, jobs, 2.0)
    for job_id, _ in jobs.values():
        assert stack.router_job(job_id)["status"] == "RUNNING"

    # A person marks a task failed: the reconciler stops its job, whatever its trigger went through.
    marked_id, marked_tree = jobs["marked"]
    stack.api.mark(DAG_ID, RUN_ID, "marked", "failed")
    wait_until(lambda: not alive(marked_tree), timeout=STOP_BUDGET, what="marked task's job stopped")
    assert stack.router_job(marked_id)["status"] == "FAILED"

    # A job that ends by itself ends its task: the trigger polls again after the faults.
    ended_id, _ = jobs["ended"]
    stopped = httpx.post(
        f"{stack.agent.url}/stop/{ended_id}",
        json={"force": False, "reason": "ended outside Airflow"},
        headers={"Authorization": f"Bearer {stack.agent.token}"},
        timeout=30,
    )
    assert stopped.status_code == 200, stopped.text
    stack.api.wait_for_state(DAG_ID, RUN_ID, "ended", {"failed"}, timeout=RESUME_BUDGET)

    kept_id, kept_tree = jobs["kept"]
    assert stack.api.task_instance(DAG_ID, RUN_ID, "kept")["state"] == "deferred"
    assert len(alive(kept_tree)) == len(kept_tree)
    assert stack.router_job(kept_id)["status"] == "RUNNING"

    # The task log told people what happened, naming the connection but never its token.
    log = stack.trigger_log("kept")
    assert "HTTP 429" in log, log[-3000:]
    assert f"refused the token of connection {CONN_ID}" in log, log[-3000:]
    # ("unreachable" shows only if a poll happened to fall into a restart's second of downtime.)
    for task_id in TASKS:
        assert stack.sidecar.token not in stack.trigger_log(task_id)


# Run in an Airflow venv with this checkout on PYTHONPATH: a sidecar stand-in on loopback answers
# 429 (Retry-After 1), 401, an ingress's HTML 404, then the job SUCCEEDED; the trigger must end
# with exactly that event and have re-read its connection after the 401.
IN_AIRFLOW = r"""
import asyncio, json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agentic_airflow.triggers import AgenticJobTrigger

ANSWERS = [
    (429, "application/json", {"error": "rate limit exceeded; retry in 1 s"}, {"Retry-After": "1"}),
    (401, "application/json", {"error": "missing or wrong token (Authorization: Bearer <token>)"}, {}),
    (404, "text/html", "<html><body>404 Not Found</body></html>", {}),
    (200, "application/json", {"job_id": "j1", "status": "SUCCEEDED", "rc": 0, "agent_id": "a"}, {}),
]
seen = []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        seen.append(self.path)
        status, kind, body, headers = ANSWERS[min(len(seen), len(ANSWERS)) - 1]
        raw = (json.dumps(body) if kind == "application/json" else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(raw)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ["AIRFLOW_CONN_AGENTIC_RUN_DEFAULT"] = f"http://:tok@127.0.0.1:{server.server_address[1]}"

old = AgenticJobTrigger(**{"job_id": "j1", "conn_id": "agentic_run_default", "poll_interval": 0.1,
                           "log_tail_bytes": 100})
path, kwargs = old.serialize()
json.dumps(kwargs)
again = AgenticJobTrigger(**kwargs)
assert again.serialize() == (path, kwargs), again.serialize()
assert AgenticJobTrigger("j1", "agentic_run_default").serialize()[0] == path
quiet = AgenticJobTrigger("j1", "agentic_run_default", log_offset=None, output_chunk_bytes=10)
assert AgenticJobTrigger(**quiet.serialize()[1]).serialize() == quiet.serialize()
# A trigger serialized before the output was shown (no such keys) still loads, showing it from 0.
assert AgenticJobTrigger(**{"job_id": "j1", "conn_id": "c"}).serialize()[1]["log_offset"] == 0


async def first_event():
    async for event in again.run():
        return event.payload


print(json.dumps({"path": path, "event": asyncio.run(first_event()), "seen": seen}))
"""


@pytest.mark.parametrize("version", [AIRFLOW_VERSION, AIRFLOW_2_VERSION], ids=lambda v: f"airflow-{v}")
def test_trigger_round_trips_and_outlasts_transient_answers_inside_airflow(
    version: str, tmp_path: Path
) -> None:
    python = ensure_venv(version) / "bin" / "python"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(python), "-c", IN_AIRFLOW],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["path"] == "agentic_airflow.triggers.AgenticJobTrigger"
    assert answer["event"]["status"] == "SUCCEEDED" and answer["event"]["job_id"] == "j1"
    polls = [path for path in answer["seen"] if not path.startswith("/jobs/j1/log?")]
    assert [path.split("?")[0] for path in polls] == ["/jobs/j1"] * 4  # long-polls: ?wait=...
    # The ended job's last output is read once, as the task's log (the stand-in has none to give).
    assert [p for p in answer["seen"] if p not in polls] == ["/jobs/j1/log?offset=0&limit=65536&cursor=true"]
