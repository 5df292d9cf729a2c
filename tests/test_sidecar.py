"""The sidecar as a real process with a real agent; Airflow is deliberately unreachable here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess

INTERVAL = 0.3


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(home=tmp_path_factory.mktemp("agent"), agent_id="agent-1", grace_seconds=2.0) as proc:
        yield proc


@pytest.fixture(scope="module")
def sidecar(agent: AgentProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: every Airflow read fails
    with SidecarProcess(
        workdir=tmp_path_factory.mktemp("sidecar"),
        airflow_url=nowhere,
        airflow_password="unused",
        agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default", "gpu"])],
        interval_seconds=INTERVAL,
    ) as proc:
        yield proc


def submission(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command": "sleep 60",
        "labels": ["default"],
        "dag_id": "dag",
        "task_id": f"task_{time.monotonic_ns()}",
        "run_id": "manual__1",
        "map_index": -1,
        "try_number": 1,
    }
    body.update(overrides)
    return body


def samples(exposition: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_status(client: httpx.Client, job_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {status} after {timeout} s: {job}")


def test_submit_runs_the_job_on_the_agent_and_records_its_exit(sidecar: SidecarProcess) -> None:
    with sidecar.client() as client:
        answer = client.post("/jobs", json=submission(command="echo hello; exit 3"))
        assert answer.status_code == 201
        job_id = answer.json()["job_id"]
        assert answer.json()["agent_id"] == "agent-1"
        job = wait_status(client, job_id, "FAILED")
        assert job["rc"] == 3
        log = client.get(f"/jobs/{job_id}/log")
        assert log.status_code == 200 and b"hello" in log.content
        trail = [e["new_status"] for e in client.get(f"/jobs/{job_id}/events").json()["events"]]
        assert trail == ["QUEUED", "RUNNING", "FAILED"]


def test_resubmitting_the_same_try_returns_the_same_job_and_starts_nothing(sidecar: SidecarProcess) -> None:
    body = submission(command="exit 0")
    with sidecar.client() as client:
        first = client.post("/jobs", json=body)
        second = client.post("/jobs", json=body)
        assert (first.status_code, second.status_code) == (201, 200)
        assert first.json()["job_id"] == second.json()["job_id"]
        assert second.json()["created"] is False


def test_airflow_unreachable_never_stops_a_running_job(sidecar: SidecarProcess) -> None:
    with sidecar.client() as client:
        job_id = client.post("/jobs", json=submission(command="sleep 30")).json()["job_id"]
        time.sleep(10 * INTERVAL)  # ten cycles, every one of them failing to read Airflow
        assert client.get(f"/jobs/{job_id}").json()["status"] == "RUNNING"
        metrics = client.get("/metrics").text
        assert samples(metrics, "reconciler_cycles_total", result="airflow_error") >= 5
        assert samples(metrics, "reconciler_stop_requests_total") == 0
        assert samples(metrics, "reconciler_divergences_total") == 0
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "reconcile cycle" in ready.json()["problems"][0]


def test_open_endpoints_need_no_token_and_the_rest_do(sidecar: SidecarProcess) -> None:
    for path in ("/healthz", "/metrics"):
        assert httpx.get(sidecar.url + path).status_code == 200
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/abc")):
        anonymous = httpx.request(method, sidecar.url + path)
        wrong = httpx.request(method, sidecar.url + path, headers={"Authorization": "Bearer nope"})
        assert (anonymous.status_code, wrong.status_code) == (401, 401)
        assert "token" in anonymous.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b"{not json", 400, "JSON"),
        (b"[1, 2]", 400, "object"),
        (b'{"command": "x"}', 400, "dag_id"),
        (None, 400, "command"),
        ("try_number", 400, "try_number"),
        ("labels", 400, "labels"),
        ("agent", 400, "agent"),
        ("huge", 413, "larger"),
    ],
)
def test_bad_submissions_get_a_clear_error_and_change_nothing(
    sidecar: SidecarProcess, body: Any, status: int, names: str
) -> None:
    import json

    if body is None:
        body = json.dumps(submission(command="")).encode()
    elif body == "try_number":
        body = json.dumps(submission(try_number="1")).encode()
    elif body == "labels":
        body = json.dumps(submission(labels=[1])).encode()
    elif body == "agent":
        body = json.dumps(submission(agent_id="agent-9")).encode()
    elif body == "huge":
        body = json.dumps(submission(command="x" * (2 * 1024 * 1024))).encode()
    with sidecar.client() as client:
        before = client.get("/jobs").json()["jobs"]
        answer = client.post("/jobs", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == status
        assert names in answer.json()["error"]
        assert client.get("/jobs").json()["jobs"] == before
        assert client.get("/healthz").status_code == 200


def test_bad_job_ids_and_queries_are_refused(sidecar: SidecarProcess) -> None:
    with sidecar.client() as client:
        assert client.get("/jobs/..%2Fetc").status_code in (400, 404)
        assert client.get("/jobs/" + "a" * 200).status_code == 400
        assert client.get("/jobs/unknown-job").status_code == 404
        assert client.get("/jobs", params={"status": "DANCING"}).status_code == 400
        assert client.get("/jobs/unknown-job/log", params={"offset": "-1"}).status_code == 404


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "bad.toml"
    config.write_text('[poll]\ninterval_seconds = "fast"\n')
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 2
    assert "[poll] interval_seconds: expected float, got str" in result.stderr
    assert "Traceback" not in result.stderr


def test_update_status_for_an_unknown_job_says_so(sidecar: SidecarProcess) -> None:
    with sidecar.client() as client:
        by_ids = client.post(
            "/jobs/update_status",
            json={"dag_id": "nope", "task_id": "nope", "run_id": "nope", "status": "FAILED"},
        )
        by_id = client.post("/jobs/update_status", json={"job_id": "0" * 32, "status": "FAILED"})
    for answer in (by_ids, by_id):
        assert answer.status_code == 404
        assert answer.json()["ok"] is False
        assert answer.json()["message"] == "Job not found with provided identifiers"


def test_update_status_never_stops_what_airflow_cannot_confirm(sidecar: SidecarProcess) -> None:
    body = submission(command="sleep 30")
    with sidecar.client() as client:
        job_id = client.post("/jobs", json=body).json()["job_id"]
        push = {k: body[k] for k in ("dag_id", "task_id", "run_id")} | {
            "status": "FAILED",
            "reason": "marked failed",
        }
        answer = client.post("/jobs/update_status", json=push)
        assert answer.status_code == 503
        assert answer.json()["ok"] is False and "nothing stopped" in answer.json()["message"]
        assert answer.json()["job_id"] == job_id
        assert client.get(f"/jobs/{job_id}").json()["status"] == "RUNNING"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"dag_id": "d", "task_id": "t", "run_id": "r"}, "status"),
        ({"dag_id": "d", "task_id": "t", "status": "FAILED"}, "run_id"),
        ({"job_id": "../../etc/passwd", "status": "FAILED"}, "job_id"),
        ({"job_id": 7, "status": "FAILED"}, "job_id"),
        ({"dag_id": "d", "task_id": "t", "run_id": "r", "status": "x" * 100}, "status"),
        ([], "object"),
    ],
)
def test_update_status_refuses_bad_requests(sidecar: SidecarProcess, body: Any, names: str) -> None:
    with sidecar.client() as client:
        answer = client.post("/jobs/update_status", json=body)
    assert answer.status_code == 400
    assert names in answer.json()["error"]


def test_a_job_the_agent_refuses_is_failed_at_submit_with_the_reason(
    agent: AgentProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with (
        SidecarProcess(
            workdir=tmp_path_factory.mktemp("sidecar-wrong-token"),
            airflow_url=f"http://127.0.0.1:{free_port()}",
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, "not-the-agents-token", labels=["default"])],
            interval_seconds=INTERVAL,
        ) as sidecar,
        sidecar.client() as client,
    ):
        answer = client.post("/jobs", json=submission())
    assert answer.status_code == 201
    body = answer.json()
    assert (body["status"], body["rc"]) == ("FAILED", None)
    assert body["reason"].startswith("agent refused the job") and "401" in body["reason"]
    assert "not-the-agents-token" not in answer.text
