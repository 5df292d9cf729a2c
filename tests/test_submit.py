"""The operator's submission rides out what may pass and fails at once on what will not.

A stand-in sidecar (a real HTTP server) answers a scripted sequence of real status codes; the waits are
recorded instead of slept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from aiohttp import web

from agentic_airflow.polling import Backoff, submit_patiently
from agentic_airflow.sidecar_client import SidecarEndpoint, SidecarError
from harness.processes import free_port
from harness.served import ServedApp

pytestmark = pytest.mark.fast

ACCEPTED = {"job_id": "j1", "agent_id": "agent-1", "status": "RUNNING", "created": True}


class ScriptedSidecar(ServedApp):
    """Answers ``POST /jobs`` with the scripted (status, body, headers) in turn; records the tokens."""

    def __init__(self, script: list[tuple[int, dict[str, Any], dict[str, str]]]) -> None:
        self.script = list(script)
        self.tokens: list[str] = []
        app = web.Application()
        app.router.add_post("/jobs", self.submit)
        super().__init__(app)

    async def submit(self, request: web.Request) -> web.Response:
        self.tokens.append(request.headers.get("Authorization", ""))
        status, body, headers = self.script.pop(0)
        if "html" in body:  # an ingress's page, not the sidecar's answer
            return web.Response(text=body["html"], status=status, content_type="text/html")
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
def log() -> logging.Logger:
    return logging.getLogger("test.submit")


@contextmanager
def serve(script: list[tuple[int, dict[str, Any], dict[str, str]]]) -> Iterator[ScriptedSidecar]:
    sidecar = ScriptedSidecar(script)
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop()


def test_transient_answers_are_retried_until_the_job_is_taken(
    log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    script = [
        (503, {"error": "restarting"}, {}),
        (429, {"error": "rate limit exceeded"}, {"Retry-After": "7"}),
        (401, {"error": "missing or wrong token"}, {}),
        (201, ACCEPTED, {}),
    ]
    with serve(script) as sidecar:
        tokens = iter(["old-token", "new-token"])  # rotated meanwhile: the connection is read again
        waits: list[float] = []
        job = submit_patiently(
            lambda: SidecarEndpoint(sidecar.url, next(tokens)),
            {"command": "true"},
            conn_id="agentic_run_default",
            log=log,
            sleep=waits.append,
            backoff=Backoff(base=0.5, cap=60.0),
        )
        assert job == ACCEPTED
        assert sidecar.tokens == ["Bearer old-token"] * 3 + ["Bearer new-token"]
        assert len(waits) == 3 and waits[1] >= 7.0  # Retry-After honoured
    assert "refused the token of connection agentic_run_default" in caplog.text
    assert "old-token" not in caplog.text and "new-token" not in caplog.text


def test_a_refusal_fails_at_once(log: logging.Logger) -> None:
    with serve([(400, {"error": "no agent has labels ['gpu']"}, {})]) as sidecar:
        waits: list[float] = []
        with pytest.raises(SidecarError, match="no agent has labels"):
            submit_patiently(
                lambda: SidecarEndpoint(sidecar.url, "t"),
                {"command": "true"},
                conn_id="c",
                log=log,
                sleep=waits.append,
            )
        assert waits == []


def test_a_sidecar_that_never_comes_back_fails_the_task_after_the_patience(log: logging.Logger) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    with pytest.raises(SidecarError, match="still failing after 120 s"):
        submit_patiently(
            lambda: SidecarEndpoint(url, "t"),
            {"command": "true"},
            conn_id="c",
            log=log,
            patience=120.0,
            sleep=sleep,
            clock=lambda: now[0],
        )
    assert sum(waits) <= 120.0 and len(waits) >= 3


def test_a_proxys_page_and_an_unreadable_connection_are_waited_out(log: logging.Logger) -> None:
    script = [(404, {"html": "<h1>404 Not Found</h1>"}, {}), (201, ACCEPTED, {})]
    with serve(script) as sidecar:
        attempts = iter([RuntimeError("secrets backend throttled: http://:tok3n@host"), None])

        def resolve() -> SidecarEndpoint:
            error = next(attempts)
            if error is not None:
                raise error
            return SidecarEndpoint(sidecar.url, "t")

        waits: list[float] = []
        job = submit_patiently(resolve, {"command": "true"}, conn_id="c", log=log, sleep=waits.append)
        assert job == ACCEPTED and len(waits) == 2
