"""What the trigger's ``on_kill`` (Airflow 3.3+) tells the sidecar: at once, retried, never raising.

The sidecar is played by ``httpx.MockTransport`` with scripted answers and the clock is fake.
tests/test_airflow_on_kill.py runs it inside a real Airflow 3.3.2 against the real sidecar.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from agentic_airflow.polling import report_kill
from agentic_airflow.sidecar_client import SidecarEndpoint, SidecarError
from harness.recording_log import RecordingLog

pytestmark = pytest.mark.fast

JOB = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"
TOKEN = "the-connection-token"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def endpoint(conn_id: str) -> SidecarEndpoint:
    return SidecarEndpoint("http://sidecar.test:8790", TOKEN)


def run(
    answers: list[Any], resolve: Any = endpoint
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], RecordingLog]:
    sent: list[dict[str, Any]] = []
    script = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert (request.method, request.url.path) == ("POST", "/jobs/update_status")
        sent.append(json.loads(request.content))
        answer = script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    log, clock = RecordingLog(), Clock()
    result = asyncio.run(
        report_kill(
            job_id=JOB,
            conn_id="agentic_run_default",
            resolve=resolve,
            log=log,
            sleep=clock.sleep,
            clock=clock,
            transport=httpx.MockTransport(handler),
        )
    )
    return result, sent, log


STOPPED = httpx.Response(200, json={"ok": True, "action": "stopped", "message": "task instance is failed"})


def test_the_kill_is_reported_once_with_the_job_id() -> None:
    result, sent, log = run([STOPPED])
    assert result is not None and result["action"] == "stopped"
    assert sent == [{"job_id": JOB, "status": "killed", "reason": "Airflow killed the task's trigger"}]
    assert log.lines[0][0] == "info" and "stopped" in log.lines[0][1]


def test_a_kept_job_is_an_answer_too() -> None:
    """Airflow still wants the task (a trigger killed for another reason): the sidecar keeps the job."""
    kept = httpx.Response(409, json={"ok": False, "action": "kept", "message": "Airflow still wants it"})
    result, sent, _ = run([kept])
    assert result is not None and result["action"] == "kept" and len(sent) == 1


def test_transient_failures_are_retried_until_an_answer() -> None:
    answers = [
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"error": "starting"}),
        httpx.Response(429, headers={"Retry-After": "1"}, json={"error": "slow down"}),
        httpx.Response(502, text="<html>bad gateway</html>"),
        STOPPED,
    ]
    result, sent, _ = run(answers)
    assert result is not None and result["action"] == "stopped" and len(sent) == 5


def test_it_gives_up_within_the_deadline_and_never_raises() -> None:
    result, sent, log = run([httpx.ConnectError("refused")] * 100)
    assert result is None
    assert 3 <= len(sent) < 20
    assert log.lines[-1][0] == "warning" and "ConnectError" in log.lines[-1][1]
    assert all(TOKEN not in line for _, line in log.lines)


def test_a_connection_that_cannot_be_read_is_retried_and_named_without_its_text() -> None:
    async def broken(conn_id: str) -> SidecarEndpoint:
        raise RuntimeError(f"postgresql://user:{TOKEN}@db/secrets unavailable")

    async def undefined(conn_id: str) -> SidecarEndpoint:
        raise SidecarError("the connection agentic_run_default is not defined")

    result, sent, log = run([], resolve=broken)
    assert result is None and sent == [] and "RuntimeError" in log.lines[-1][1]
    assert all(TOKEN not in line for _, line in log.lines)
    result, _, log = run([], resolve=undefined)
    assert result is None and "is not defined" in log.lines[-1][1]
