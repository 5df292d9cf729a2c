"""The operator as Airflow drives it: ``execute`` submits and raises ``TaskDeferred`` with the trigger,
and ``execute_complete`` turns the trigger's event into the task's outcome.

Runs inside the real Airflow 3.3.2 and 2.11.2 venvs (this checkout on the path), against a sidecar
stand-in on loopback that records the submission; no Airflow servers are started. The whole path
through a running Airflow is tests/test_airflow_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.airflow import AIRFLOW_2_VERSION, AIRFLOW_VERSION, ensure_venv

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parent.parent

IN_AIRFLOW = r"""
import json, os, threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

from airflow.exceptions import AirflowException, TaskDeferred

from agentic_airflow.operators import AgenticRunOperator

JOB = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"
submitted = []


class Sidecar(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        submitted.append({**body, "authorization": self.headers["Authorization"]})
        raw = json.dumps({"job_id": JOB, "agent_id": "vm-01", "status": "RUNNING", "created": True}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Sidecar)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ["AIRFLOW_CONN_AGENTIC_RUN_DEFAULT"] = f"http://:tok@127.0.0.1:{server.server_address[1]}"

pushed = {}
ti = SimpleNamespace(
    dag_id="d", task_id="t", run_id="manual__1", map_index=-1, try_number=2, id="0190a3b4-ti",
    start_date=None, xcom_push=lambda key, value: pushed.__setitem__(key, value),
)
found = {}
for name, options in (("plain", {}), ("timeout", {"execution_timeout": timedelta(minutes=10)}),
                      ("quiet", {"stream_output": False}), ("once", {"at_most_once": True})):
    op = AgenticRunOperator(task_id="t", command="echo hi", route_labels=["gpu"], **options)
    try:
        op.execute({"ti": ti})
        found[name] = {"deferred": False}
    except TaskDeferred as deferred:
        path, kwargs = deferred.trigger.serialize()
        found[name] = {
            "deferred": True, "path": path, "kwargs": kwargs, "method": deferred.method_name,
            "timeout": deferred.timeout.total_seconds() if deferred.timeout else None,
        }

op = AgenticRunOperator(task_id="t", command="echo hi")
found["success"] = op.execute_complete({}, {"job_id": JOB, "status": "SUCCEEDED", "rc": 0})
try:
    op.execute_complete({}, {"job_id": JOB, "status": "FAILED", "rc": 3, "reason": "exited with code 3",
                             "log_tail": "Traceback: boom\n"})
except AirflowException as exc:
    found["failure"] = str(exc)
found["submitted"] = submitted
found["pushed"] = pushed
print(json.dumps(found))
"""


@pytest.mark.parametrize("version", [AIRFLOW_VERSION, AIRFLOW_2_VERSION], ids=lambda v: f"airflow-{v}")
def test_execute_submits_and_defers_and_the_event_decides_the_outcome(version: str, tmp_path: Path) -> None:
    python = ensure_venv(version) / "bin" / "python"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(python), "-c", IN_AIRFLOW], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    job = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"

    plain = found["plain"]
    assert plain["deferred"] and plain["method"] == "execute_complete"
    assert plain["path"] == "agentic_airflow.triggers.AgenticJobTrigger"
    assert plain["kwargs"]["job_id"] == job and plain["kwargs"]["log_offset"] == 0
    assert plain["timeout"] is None
    # execution_timeout reaches the agent and the deferral (with a minute's slack for the agent's report).
    assert 600 - 5 <= found["timeout"]["timeout"] - 60 <= 600
    assert found["quiet"]["kwargs"]["log_offset"] is None  # stream_output=False: no output read

    first = found["submitted"][0]
    key = (first["dag_id"], first["task_id"], first["run_id"], first["try_number"])
    assert key == ("d", "t", "manual__1", 2)
    assert (first["labels"], first["ti_identity"], first["timeout_seconds"]) == (["gpu"], "0190a3b4-ti", None)
    assert first["authorization"] == "Bearer tok"  # the connection's password is the token
    assert 595 <= found["submitted"][1]["timeout_seconds"] <= 600
    # at_most_once=True asks the agent to fence the job (agent/fence.py); by default it does not.
    assert (first["at_most_once"], found["submitted"][3]["at_most_once"]) == (False, True)
    assert found["pushed"] == {"agentic_job_id": job}  # before deferring

    assert found["success"] == job
    assert f"job {job} FAILED with rc=3: exited with code 3" in found["failure"]
    assert "Traceback: boom" in found["failure"]
