"""A task waiting to submit its job ends within 2 s of SIGTERM, on a real Airflow 3.3.2 and 2.11.2, and
its log says why and what became of the job.

The operator retries a submission that fails for a reason that may pass (for up to 10 minutes): here a
sidecar stand-in that answers 503, a connection that is not defined, a port that refuses connections,
and a stand-in that takes the request and never answers. A fifth task waits on the hook's long-poll of
a job at that silent stand-in. Each task (tests/dags/agentic_submit_sigterm.py) is stopped as Airflow
stops a task: SIGTERM to the task process (what Airflow 3's supervisor and Airflow 2's task runner
send, and what a person on call sends), or a person marks it failed and Airflow itself sends the
SIGTERM. The task process must be gone within 2 s of the signal.

Airflow 3's own handler of SIGTERM in a task only calls ``on_kill``: before the fix these tasks went on
waiting (the marked one until its supervisor's SIGKILL, 5 s later). Airflow 2's raises, but its log
did not say what became of the job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest

from harness.airflow import AIRFLOW_2_VERSION, AIRFLOW_VERSION, AirflowAPI, AirflowServer, major
from harness.processes import alive, free_port, wait_until

pytestmark = pytest.mark.airflow

DAGS = Path(__file__).parent / "dags"
DAG_ID, RUN_ID = "submit_sigterm", "sigterm"
STOP_BUDGET = 2.0  # SIGTERM -> the task process is gone
HEARTBEAT_SECONDS = 1  # how often Airflow looks at a running task's state (set below, both versions)
# Marked failed -> Airflow's next heartbeat sees it and sends SIGTERM -> gone; plus a second for the
# API's write and the heartbeat's round trip on two busy cores. Before the fix, Airflow 3 sent SIGKILL
# 5 s after its SIGTERM, and Airflow 2 60 s after.
MARK_BUDGET = HEARTBEAT_SECONDS + STOP_BUDGET + 1.0
WAITING = "stopped by SIGTERM while waiting to submit"
RETRYING = re.compile(r"retrying in (\d+\.\d) s")
BACKOFF_SECONDS = 5.0  # a task is SIGTERMed in a backoff at least this long (this far from a request)


class Unavailable(BaseHTTPRequestHandler):
    """The sidecar with no agent that has room: 503 with its JSON error, nothing recorded."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        raw = json.dumps({"error": "no capacity: 1 agent(s) carry labels []: vm-1 full 4/4"}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Retry-After", "30")  # the task's next try waits that long
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


class Silent(BaseHTTPRequestHandler):
    """Takes every request and never answers (a sidecar stuck on its router DB): a job submitted
    there may exist. Records when each request came, by method."""

    arrived: ClassVar[dict[str, list[float]]] = {"GET": [], "POST": []}
    release = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Silent.arrived["POST"].append(time.monotonic())
        Silent.release.wait(300)

    def do_GET(self) -> None:
        Silent.arrived["GET"].append(time.monotonic())
        Silent.release.wait(300)

    @staticmethod
    def waiting(method: str) -> bool:
        """A ``method`` request is held now (the operator gives up on one after 30 s, the hook's
        long-poll after 70 s): well inside it, not at its edges."""
        times = Silent.arrived[method]
        return bool(times) and 0.5 < time.monotonic() - times[-1] < 20.0

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Stack:
    airflow: AirflowServer
    api: AirflowAPI

    def log(self, task_id: str) -> str:
        path = (
            self.airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={RUN_ID}" / f"task_id={task_id}"
        ) / "attempt=1.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def harness_logs(self) -> str:
        folder = self.airflow.home / "logs-harness"
        return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("*.log")))

    def waiting_task(self, task_id: str, shows: str) -> psutil.Process:
        """The process of ``task_id`` once its log's newest line says that it retries its submission
        (``shows``) in BACKOFF_SECONDS or more: it is in that backoff now, not in a request."""

        def backing_off() -> bool:
            lines = [line for line in self.log(task_id).splitlines() if shows in line]
            found = RETRYING.search(lines[-1]) if lines else None
            return found is not None and float(found.group(1)) >= BACKOFF_SECONDS

        wait_until(backing_off, timeout=120, what=f"{task_id}'s log: {shows!r} ... retrying in >= 5 s")
        ti = self.api.task_instance(DAG_ID, RUN_ID, task_id)
        assert ti["state"] == "running", ti
        return psutil.Process(int(ti["pid"]))

    def ended(self, task_id: str, reason: str) -> str:
        """The task's log once it failed and names ``reason``."""
        self.api.wait_for_state(DAG_ID, RUN_ID, task_id, {"failed"}, timeout=60)
        wait_until(lambda: reason in self.log(task_id), timeout=15, what=f"{task_id}'s log: {reason!r}")
        return self.log(task_id)


@pytest.fixture(scope="module", params=[AIRFLOW_VERSION, AIRFLOW_2_VERSION], ids=lambda v: f"airflow-{v}")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    version: str = request.param
    base = tmp_path_factory.mktemp(f"sigterm-{version}")
    unavailable = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    silent = ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    Silent.arrived = {"GET": [], "POST": []}
    Silent.release.clear()
    for server in (unavailable, silent):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = (
        {
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": str(HEARTBEAT_SECONDS),
            # The api-server's first answers to workers take tens of seconds on two busy cores: the
            # default 5 s (5 tries) fails tasks before they start.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        }
        if major(version) == 3
        else {"AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": str(HEARTBEAT_SECONDS)}
    )
    settings["AIRFLOW__CORE__PARALLELISM"] = "5"  # every task of the DAG at once
    airflow = AirflowServer(
        home=base / "airflow",
        dags_folder=DAGS,
        version=version,
        extra_env=settings,
        connections={
            "sigterm_503": f"http://:tok@127.0.0.1:{unavailable.server_address[1]}",
            "sigterm_silent": f"http://:tok@127.0.0.1:{silent.server_address[1]}",
            "sigterm_refused": f"http://:tok@127.0.0.1:{free_port()}",  # nothing listens
        },
    )
    try:
        airflow.start()
        api = airflow.api()
        api.wait_for_dag(DAG_ID)
        api.trigger(DAG_ID, RUN_ID)
        yield Stack(airflow, api)
    finally:
        Silent.release.set()
        airflow.stop()
        for server in (unavailable, silent):
            server.shutdown()
            server.server_close()


def sigterm(process: psutil.Process) -> float:
    """Send SIGTERM to ``process`` as Airflow does; the seconds until it is gone (at most 30)."""
    sent = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    wait_until(lambda: not alive([process]), timeout=30, what=f"task process {process.pid} gone")
    return time.monotonic() - sent


@pytest.mark.parametrize(
    ("task_id", "retrying"),
    [
        ("killed_503", "job not submitted yet: sidecar at http://127.0.0.1"),  # ...: HTTP 503: no capacity
        ("killed_missing", "job not submitted yet: connection sigterm_missing"),  # ...: is not defined
    ],
)
def test_sigterm_ends_a_task_waiting_to_submit_and_its_log_says_no_job_was_started(
    stack: Stack, task_id: str, retrying: str
) -> None:
    process = stack.waiting_task(task_id, retrying)
    took = sigterm(process)
    print(f"{stack.airflow.version} {task_id}: gone {took:.2f} s after SIGTERM")
    assert took < STOP_BUDGET, f"{task_id} took {took:.1f} s to end after SIGTERM"
    log = stack.ended(task_id, WAITING)
    assert "no job was started" in log, log[-3000:]


def test_sigterm_ends_a_submission_in_flight_and_says_what_becomes_of_its_job(stack: Stack) -> None:
    task_id = "killed_in_flight"
    wait_until(lambda: Silent.waiting("POST"), timeout=120, what="a submission held by the silent sidecar")
    process = psutil.Process(int(stack.api.task_instance(DAG_ID, RUN_ID, task_id)["pid"]))
    took = sigterm(process)
    print(f"{stack.airflow.version} {task_id}: gone {took:.2f} s after SIGTERM")
    assert took < STOP_BUDGET, f"{task_id} took {took:.1f} s to end after SIGTERM"
    log = stack.ended(task_id, "stopped by SIGTERM while submitting")
    # The sidecar may have taken the job: the log says it is stopped once the task is no longer running.
    assert "the sidecar may have started a job" in log, log[-3000:]
    assert "stops it" in log, log[-3000:]


def test_sigterm_ends_the_hooks_long_poll(stack: Stack) -> None:
    task_id = "hook_long_poll"
    wait_until(lambda: Silent.waiting("GET"), timeout=120, what="a long-poll held by the silent sidecar")
    process = psutil.Process(int(stack.api.task_instance(DAG_ID, RUN_ID, task_id)["pid"]))
    took = sigterm(process)
    print(f"{stack.airflow.version} {task_id}: gone {took:.2f} s after SIGTERM")
    assert took < STOP_BUDGET, f"{task_id} took {took:.1f} s to end after SIGTERM"
    stack.ended(task_id, "stopped by SIGTERM while waiting for the sidecar's answer about job")


def test_marking_the_task_failed_ends_it_through_airflows_own_sigterm(stack: Stack) -> None:
    task_id = "marked_refused"
    process = stack.waiting_task(task_id, "job not submitted yet: sidecar at http://127.0.0.1")
    marked = time.monotonic()
    stack.api.mark(DAG_ID, RUN_ID, task_id, "failed")
    wait_until(lambda: not alive([process]), timeout=90, what=f"task process {process.pid} gone")
    took = time.monotonic() - marked
    print(f"{stack.airflow.version} {task_id}: gone {took:.2f} s after being marked failed")
    assert took < MARK_BUDGET, f"{task_id} took {took:.1f} s to end after being marked failed"
    # Airflow's SIGTERM did it: it never had to escalate to SIGKILL.
    escalated = re.compile(
        rf"did not terminate in time.*{process.pid}|{process.pid}.*did not terminate in time"
    )
    assert not escalated.search(stack.harness_logs())
    log = stack.ended(task_id, WAITING)
    assert "no job was started" in log, log[-3000:]
