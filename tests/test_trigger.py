"""The trigger's wait for a job: only the job's end, or the sidecar's own "no such job", ends a task.

The poller (``agentic_airflow.polling.JobPoller``, what ``AgenticJobTrigger.run`` runs) is driven
through ``httpx.MockTransport`` with scripted answers and a fake clock (no real waiting), and at the
end against the real sidecar process with a real rate limit. Airflow itself is not needed here:
tests/test_airflow_trigger_faults.py runs the trigger inside Airflow.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from agentic_airflow.polling import RESUME_SETTLE_SECONDS, Backoff, JobPoller
from agentic_airflow.sidecar_client import (
    AnswerKind,
    SidecarEndpoint,
    SidecarError,
    classify_job_answer,
    get_job,
    retry_after_seconds,
)
from harness.agent import AgentProcess
from harness.processes import free_port
from harness.recording_log import RecordingLog
from harness.sidecar import AgentRef, SidecarProcess

JOB = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"
CONN = "agentic_run_default"
TOKEN = "the-connection-token"
BASE = "http://sidecar.test:8790"
POLL = 1.0
NOW = datetime(2026, 11, 24, 3, 37, 42, tzinfo=UTC)


# --- the classification: which answers are facts about the job ------------------------------------


def classify(
    status: int, body: bytes = b"", *, content_type: str = "application/json", retry: str = ""
) -> Any:
    return classify_job_answer(
        JOB, status_code=status, content_type=content_type, body=body, retry_after=retry or None, now=NOW
    )


@pytest.mark.parametrize(
    ("status", "body", "content_type", "kind"),
    [
        (200, b'{"job_id": "%s", "status": "RUNNING"}' % JOB.encode(), "application/json", AnswerKind.JOB),
        (200, b'{"status": "FAILED", "rc": 3}', "application/json", AnswerKind.JOB),
        (
            404,
            b'{"error": "job not found: %s"}' % JOB.encode(),
            "application/json; charset=utf-8",
            AnswerKind.NO_SUCH_JOB,
        ),
        # 404s that are not the sidecar's answer about this job: a proxy, an ingress, another route.
        (404, b"<html><body><h1>404 Not Found</h1>nginx</body></html>", "text/html", AnswerKind.UNUSABLE),
        (404, b'{"error": "job not found: %s"}' % JOB.encode(), "text/html", AnswerKind.UNUSABLE),
        (404, b'{"error": "Not Found"}', "application/json", AnswerKind.UNUSABLE),
        (404, b'{"detail": "Not Found"}', "application/json", AnswerKind.UNUSABLE),
        (404, b'{"error": "job not found: another-job"}', "application/json", AnswerKind.UNUSABLE),
        (404, b"", "application/json", AnswerKind.UNUSABLE),
        (429, b'{"error": "rate limit exceeded; retry in 2 s"}', "application/json", AnswerKind.THROTTLED),
        (401, b'{"error": "missing or wrong token"}', "application/json", AnswerKind.UNAUTHORIZED),
        (403, b"Forbidden", "text/plain", AnswerKind.UNAUTHORIZED),
        (
            500,
            b'{"error": "internal error; see the sidecar log"}',
            "application/json",
            AnswerKind.UNAVAILABLE,
        ),
        (502, b"<html>Bad Gateway</html>", "text/html", AnswerKind.UNAVAILABLE),
        (503, b"", "text/plain", AnswerKind.UNAVAILABLE),
        (200, b"<html>Sign in</html>", "text/html", AnswerKind.UNUSABLE),
        (200, b'{"status": 3}', "application/json", AnswerKind.UNUSABLE),
        (200, b'["RUNNING"]', "application/json", AnswerKind.UNUSABLE),
        (200, b'{"job_id": "another-job", "status": "FAILED"}', "application/json", AnswerKind.UNUSABLE),
        (200, b'{"status": "RUNNING"', "application/json", AnswerKind.UNUSABLE),
        (400, b'{"error": "job id must match ..."}', "application/json", AnswerKind.UNUSABLE),
        (302, b"", "text/html", AnswerKind.UNUSABLE),
    ],
)
@pytest.mark.fast
def test_answers_are_classified(status: int, body: bytes, content_type: str, kind: AnswerKind) -> None:
    answer = classify(status, body, content_type=content_type)
    assert answer.kind is kind, answer
    assert answer.final == (kind is AnswerKind.NO_SUCH_JOB or (answer.job or {}).get("status") == "FAILED")


@pytest.mark.fast
def test_only_terminal_statuses_and_the_sidecars_404_are_final() -> None:
    for status, final in (
        ("QUEUED", False),
        ("RUNNING", False),
        ("STOPPING", False),
        ("SUCCEEDED", True),
        ("FAILED", True),
        ("SOMETHING_NEW", False),
    ):
        assert classify(200, b'{"status": "%s"}' % status.encode()).final is final, status
    for code in (401, 403, 429, 500, 503):
        assert not classify(code).final


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        ("Tue, 24 Nov 2026 03:38:12 GMT", 30.0),
        ("Tue, 24 Nov 2026 03:30:00 GMT", 0.0),  # already past: retry now
        ("soon", None),
        ("", None),
        ("nan", None),
        ("inf", None),
    ],
)
@pytest.mark.fast
def test_retry_after_reads_seconds_and_http_dates(header: str, seconds: float | None) -> None:
    assert retry_after_seconds(header, now=NOW) == seconds
    if seconds is not None:
        assert classify(429, retry=header).retry_after == seconds


@pytest.mark.fast
def test_backoff_doubles_from_the_poll_interval_to_its_cap_with_jitter() -> None:
    backoff = Backoff(1.0, 60.0, random.Random(1))
    ceilings = [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    delays = [backoff.next_delay() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert max(1.0, ceiling / 2) <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered: triggers failing together spread out
    assert backoff.next_delay(at_least=45.0) >= 45.0  # Retry-After is honoured...
    assert backoff.next_delay(at_least=86400.0) <= 60.0  # ...up to the cap
    backoff.reset()
    assert 1.0 <= backoff.next_delay() <= 2.0
    for _ in range(2000):  # no overflow however long the outage
        assert backoff.next_delay() <= 60.0


# --- the poller against scripted answers ------------------------------------------------------------


def job(status: str, **fields: Any) -> httpx.Response:
    return httpx.Response(200, json={"job_id": JOB, "status": status, "agent_id": "vm-01", **fields})


def error(code: int, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(code, json={"error": message}, headers=headers)


def html(code: int) -> httpx.Response:
    page = f"<html><head><title>{code}</title></head><body><center>nginx</center></body></html>"
    return httpx.Response(code, text=page, headers={"Content-Type": "text/html"})


NOT_FOUND = f"job not found: {JOB}"
OUTPUT = b"step 1\nstep 2\nTraceback: boom\n"


class Sidecar:
    """Answers ``GET /jobs/{JOB}`` from a script (the last answer repeats) and serves the job's log."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/jobs/{JOB}/log":
            offset = int(request.url.params.get("offset", "0"))
            return httpx.Response(200, content=OUTPUT[offset:], headers={"X-Log-Size": str(len(OUTPUT))})
        assert request.url.path == f"/jobs/{JOB}", request.url
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def tokens(self) -> list[str]:
        return [r.headers["Authorization"].removeprefix("Bearer ") for r in self.requests]


class Connection:
    """``aget_endpoint`` as the trigger gets it: each call takes the next outcome (the last repeats)."""

    def __init__(self, *outcomes: SidecarEndpoint | Exception) -> None:
        self.outcomes = list(outcomes) or [SidecarEndpoint(BASE, TOKEN)]
        self.calls = 0

    async def __call__(self, conn_id: str) -> SidecarEndpoint:
        assert conn_id == CONN
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


Log = RecordingLog


class Clock:
    """Time that passes only when the poller sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class Run:
    def __init__(self, sidecar: Sidecar, connection: Connection | None = None, **options: Any) -> None:
        self.sidecar = sidecar
        self.connection = connection or Connection()
        self.log = Log()
        self.clock = Clock()
        self.poller = JobPoller(
            job_id=JOB,
            conn_id=CONN,
            resolve=self.connection,
            log=self.log,
            poll_interval=POLL,
            sleep=self.clock.sleep,
            clock=self.clock,
            rng=random.Random(3),
            transport=httpx.MockTransport(sidecar),
            **({"log_offset": None} | options),  # the output in the task's log: tests/test_trigger_output.py
        )

    def event(self) -> dict[str, Any]:
        return asyncio.run(asyncio.wait_for(self.poller.run(), timeout=10))


@pytest.mark.fast
def test_a_rate_limited_poll_waits_what_retry_after_asks_and_continues() -> None:
    run = Run(
        Sidecar(
            error(429, "rate limit exceeded; retry in 7 s", **{"Retry-After": "7"}),
            job("RUNNING"),
            job("SUCCEEDED", rc=0),
        )
    )
    event = run.event()
    assert event["status"] == "SUCCEEDED" and event["rc"] == 0
    assert len(run.sidecar.requests) == 3
    assert run.clock.sleeps[0] >= 7.0
    assert run.clock.sleeps[1] == POLL  # answered again: back to the poll interval
    (warning,) = run.log.at("warning")
    assert "rate-limiting" in warning and "HTTP 429: rate limit exceeded; retry in 7 s" in warning
    assert run.log.at("info") == [
        f"job {JOB}: sidecar at {BASE} answers again; failed polls: 1 over {run.clock.sleeps[0]:.0f} s"
    ]


@pytest.mark.fast
def test_retry_after_as_an_http_date_is_honoured_and_a_huge_one_capped() -> None:
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=40), usegmt=True)
    run = Run(
        Sidecar(
            error(429, "slow down", **{"Retry-After": soon}),
            error(429, "slow down", **{"Retry-After": "86400"}),
            job("SUCCEEDED"),
        )
    )
    assert run.event()["status"] == "SUCCEEDED"
    assert 38.0 <= run.clock.sleeps[0] <= 41.0
    assert run.clock.sleeps[1] == 60.0


@pytest.mark.parametrize("code", [401, 403])
@pytest.mark.fast
def test_a_refused_token_rereads_the_connection_and_retries_with_the_rotated_one(code: int) -> None:
    rotated = "the-rotated-token"

    class Rotating(Sidecar):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.headers["Authorization"] != f"Bearer {rotated}":
                self.requests.append(request)
                return error(code, "missing or wrong token (Authorization: Bearer <token>)")
            return super().__call__(request)

    connection = Connection(
        SidecarEndpoint(BASE, TOKEN), SidecarEndpoint(BASE, TOKEN), SidecarEndpoint(BASE, rotated)
    )
    run = Run(Rotating(job("SUCCEEDED")), connection)
    assert run.event()["status"] == "SUCCEEDED"
    assert connection.calls == 3  # read once, then again after each refusal
    assert run.sidecar.tokens == [TOKEN, TOKEN, rotated]
    errors = run.log.at("error")
    assert len(errors) == 1  # the second refusal is the same trouble: held back
    assert f"refused the token of connection {CONN}" in errors[0] and f"HTTP {code}" in errors[0]
    assert TOKEN not in run.log.text and rotated not in run.log.text


@pytest.mark.parametrize(
    "answer",
    [
        html(404),
        httpx.Response(404),
        httpx.Response(404, json={"detail": "Not Found"}),
        error(404, "Not Found"),  # the sidecar's answer for a path it has no route for
        error(404, "job not found: another-job"),
    ],
    ids=["html", "empty", "detail", "route", "other-job"],
)
@pytest.mark.fast
def test_a_404_that_is_not_the_sidecars_answer_about_the_job_is_retried(answer: httpx.Response) -> None:
    run = Run(Sidecar(answer, answer, job("RUNNING"), job("FAILED", rc=1, reason="exit 1")))
    event = run.event()
    assert event["status"] == "FAILED"
    assert len(run.sidecar.requests) == 4
    (warning,) = run.log.at("warning")
    assert "unusable answer" in warning and "HTTP 404" in warning


@pytest.mark.fast
def test_the_sidecars_own_404_for_the_job_ends_the_wait() -> None:
    run = Run(Sidecar(error(404, NOT_FOUND), job("SUCCEEDED")))
    event = run.event()
    assert event == {
        "job_id": JOB,
        "status": "ERROR",
        "error": f"sidecar at {BASE} has no such job ({NOT_FOUND})",
    }
    assert len(run.sidecar.requests) == 1 and run.clock.sleeps == []
    assert run.log.at("error") == [f"job {JOB}: {event['error']}; ending the task"]


@pytest.mark.fast
def test_a_terminal_status_ends_the_wait_with_the_jobs_outcome_and_output() -> None:
    run = Run(
        Sidecar(
            job("QUEUED"),
            job("RUNNING"),
            job("STOPPING"),
            job("FAILED", rc=-15, reason="task instance is failed", finished_at="2026-11-24T03:40:00"),
        )
    )
    event = run.event()
    assert event == {
        "job_id": JOB,
        "status": "FAILED",
        "rc": -15,
        "reason": "task instance is failed",
        "agent_id": "vm-01",
        "finished_at": "2026-11-24T03:40:00",
        "log_tail": OUTPUT.decode(),
    }
    assert run.clock.sleeps == [POLL, POLL, POLL]  # a failure is reported at once
    assert run.log.lines == []

    # A success within seconds of the start waits out the rest of RESUME_SETTLE_SECONDS.
    quick = Run(Sidecar(job("SUCCEEDED", rc=0)), log_tail_bytes=10)
    succeeded = quick.event()
    assert succeeded["log_tail"] == "" and succeeded["rc"] == 0
    assert quick.clock.sleeps == [RESUME_SETTLE_SECONDS]


@pytest.mark.parametrize(
    ("answer", "logged"),
    [
        (httpx.ConnectError("Connection refused"), f"sidecar at {BASE} unreachable: ConnectError"),
        (httpx.ReadTimeout("timed out"), f"sidecar at {BASE} unreachable: ReadTimeout"),
        (httpx.RemoteProtocolError("Server disconnected"), "unreachable: RemoteProtocolError"),
        (error(500, "internal error; see the sidecar log"), "failed (HTTP 500: internal error"),
        (html(502), "failed (HTTP 502)"),
        (httpx.Response(503, headers={"Retry-After": "3"}), "failed (HTTP 503)"),
        (html(200), "unusable answer"),
        (httpx.Response(200, json={"job_id": JOB}), "without a job status"),
        (httpx.Response(200, json=["RUNNING"]), "not a JSON object"),
        (error(400, "job id must match ..."), "(HTTP 400: job id must match ...)"),
        (httpx.Response(302, headers={"Location": "https://sso.example/login"}), "(HTTP 302)"),
    ],
    ids=[
        "connect",
        "timeout",
        "disconnect",
        "500",
        "502-html",
        "503",
        "200-html",
        "no-status",
        "not-object",
        "400",
        "redirect",
    ],
)
@pytest.mark.fast
def test_transient_trouble_is_logged_and_retried(answer: httpx.Response | Exception, logged: str) -> None:
    run = Run(Sidecar(answer, answer, answer, job("RUNNING"), job("SUCCEEDED")))
    assert run.event()["status"] == "SUCCEEDED"
    assert len(run.sidecar.requests) == 5
    (warning,) = run.log.at("warning")  # three alike: one line
    assert logged in warning and "retrying in" in warning, warning
    assert len(run.clock.sleeps) == 4
    assert all(POLL <= s <= 8.0 for s in run.clock.sleeps[:3])
    if isinstance(answer, httpx.Response) and answer.status_code == 503:
        assert run.clock.sleeps[0] >= 3.0  # Retry-After on a 503 is honoured too


@pytest.mark.fast
def test_an_unresolvable_connection_or_unloadable_ca_is_retried_and_the_token_never_logged() -> None:
    connection = Connection(
        SidecarError(f"the connection {CONN} is not defined"),
        RuntimeError(f"cannot parse http://:{TOKEN}@sidecar.test:8790"),  # a foreign error quoting a URI
        SidecarEndpoint(BASE, TOKEN, ca_file="/nonexistent/ca.pem"),
        SidecarEndpoint(BASE, TOKEN),
    )
    run = Run(Sidecar(job("SUCCEEDED")), connection)
    assert run.event()["status"] == "SUCCEEDED"
    assert connection.calls == 4
    assert len(run.sidecar.requests) == 1
    errors = run.log.at("error")
    assert len(errors) == 3
    assert f"cannot use the connection {CONN} (the connection {CONN} is not defined)" in errors[0]
    assert f"cannot use the connection {CONN} (RuntimeError)" in errors[1]
    assert "ca_file /nonexistent/ca.pem" in errors[2]
    assert TOKEN not in run.log.text


@pytest.mark.fast
def test_backoff_grows_over_consecutive_failures_and_restarts_after_an_answer() -> None:
    down = httpx.ConnectError("Connection refused")
    run = Run(Sidecar(*[down] * 7, job("RUNNING"), down, job("SUCCEEDED")))
    assert run.event()["status"] == "SUCCEEDED"
    sleeps = run.clock.sleeps
    for delay, ceiling in zip(sleeps[:7], [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0], strict=True):
        assert ceiling / 2 <= delay <= ceiling, sleeps
    assert sleeps[7] == POLL
    assert POLL <= sleeps[8] <= 2 * POLL, sleeps


@pytest.mark.fast
def test_repeated_identical_trouble_is_logged_once_a_minute_and_each_new_kind_at_once() -> None:
    throttled = error(429, "rate limit exceeded; retry in 1 s", **{"Retry-After": "1"})
    refused = error(401, "missing or wrong token (Authorization: Bearer <token>)")
    down = httpx.ConnectError("Connection refused")
    # max_backoff 1: one poll a second, so 150 answers span 150 s.
    run = Run(Sidecar(*[throttled] * 150, *[refused] * 3, *[down] * 3, job("SUCCEEDED")), max_backoff=1.0)
    assert run.event()["status"] == "SUCCEEDED"
    warnings, errors = run.log.at("warning"), run.log.at("error")
    throttled_lines = [w for w in warnings if "rate-limiting" in w]
    assert len(throttled_lines) == 3  # at 0 s, 60 s and 120 s
    assert "(59 more like this since the last report)" in throttled_lines[1]
    assert len(errors) == 1 and "refused the token" in errors[0]
    assert len([w for w in warnings if "unreachable" in w]) == 1
    assert run.log.at("info") == [f"job {JOB}: sidecar at {BASE} answers again; failed polls: 156 over 156 s"]


@pytest.mark.fast
def test_a_sidecar_throttling_every_other_poll_does_not_fill_the_log() -> None:
    throttled = error(429, "rate limit exceeded; retry in 1 s", **{"Retry-After": "1"})
    # Each 429 then an answer: 2 s a pair, 80 s in all, with max_backoff 1.
    run = Run(Sidecar(*[throttled, job("RUNNING")] * 40, job("SUCCEEDED")), max_backoff=1.0)
    assert run.event()["status"] == "SUCCEEDED"
    warnings = run.log.at("warning")
    assert len(warnings) == 2, warnings  # at 0 s and past 60 s
    assert "(29 more like this since the last report)" in warnings[1]
    assert len(run.log.at("info")) == 2  # the end of each reported streak, not of the held-back ones


@pytest.mark.fast
def test_get_job_returns_the_record_and_raises_on_anything_else() -> None:
    async def fetch(answer: httpx.Response) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(Sidecar(answer))) as client:
            return await get_job(client, JOB)

    assert asyncio.run(fetch(job("RUNNING")))["status"] == "RUNNING"
    with pytest.raises(SidecarError, match=rf"sidecar: job not found: {JOB}"):
        asyncio.run(fetch(error(404, NOT_FOUND)))
    with pytest.raises(SidecarError, match="HTTP 429"):
        asyncio.run(fetch(error(429, "rate limit exceeded; retry in 1 s")))


# --- the poller against the real sidecar process ----------------------------------------------------


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    base = tmp_path_factory.mktemp("trigger")
    with (
        AgentProcess(home=base / "agent", agent_id="agent-1") as agent,
        SidecarProcess(
            workdir=base / "sidecar",
            airflow_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: the loop stops nothing
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            rate_limit_per_second=4.0,
            rate_limit_burst=4,
        ) as proc,
    ):
        yield proc


def submit(sidecar: SidecarProcess, command: str) -> str:
    body = {
        "command": command,
        "labels": ["default"],
        "dag_id": "trigger",
        "task_id": f"t{time.monotonic_ns()}",
        "run_id": "manual__1",
        "map_index": -1,
        "try_number": 1,
    }
    with sidecar.client() as client:
        answer = client.post("/jobs", json=body)
        while answer.status_code == 429:
            time.sleep(0.2)
            answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def real_poller(job_id: str, connection: Connection, log: Log) -> JobPoller:
    return JobPoller(job_id=job_id, conn_id=CONN, resolve=connection, log=log, poll_interval=0.1)


def test_pollers_ride_out_the_real_sidecars_429_and_401_and_end_on_its_answers(
    sidecar: SidecarProcess,
) -> None:
    job_id = submit(sidecar, "sleep 1; echo done; exit 3")
    good = SidecarEndpoint(sidecar.url, sidecar.token)
    logs = [Log() for _ in range(4)]
    connections = [Connection(good) for _ in range(3)]
    connections.append(Connection(SidecarEndpoint(sidecar.url, "a-stale-token"), good))

    async def together() -> list[dict[str, Any]]:
        # Four pollers ten times a second share one token's bucket of four a second: mostly 429.
        pollers = [real_poller(job_id, c, log) for c, log in zip(connections, logs, strict=True)]
        return await asyncio.wait_for(asyncio.gather(*(p.run() for p in pollers)), timeout=60)

    events = asyncio.run(together())
    assert [(e["job_id"], e["status"], e["rc"]) for e in events] == [(job_id, "FAILED", 3)] * 4
    text = "\n".join(log.text for log in logs)
    assert "is rate-limiting polls (HTTP 429: rate limit exceeded" in text
    assert f"refused the token of connection {CONN} (HTTP 401" in logs[3].text
    assert connections[3].calls == 2
    assert sidecar.token not in text and "a-stale-token" not in text

    time.sleep(1.5)  # let the bucket refill
    unknown = asyncio.run(real_poller("no-such-job", Connection(good), Log()).run())
    assert unknown["status"] == "ERROR"
    assert unknown["error"] == f"sidecar at {sidecar.url} has no such job (job not found: no-such-job)"


def test_the_real_sidecars_answers_classify_as_expected(sidecar: SidecarProcess) -> None:
    def answer(client: httpx.Client, path: str, token: str) -> Any:
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        return classify_job_answer(
            path.rsplit("/", 1)[-1],
            status_code=response.status_code,
            content_type=response.headers.get("Content-Type", ""),
            body=response.content,
            retry_after=response.headers.get("Retry-After"),
            now=datetime.now(UTC),
        )

    time.sleep(1.5)  # the token's bucket refills after the test before
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        assert answer(client, "/jobs/unknown-job", sidecar.token).kind is AnswerKind.NO_SUCH_JOB
        assert answer(client, "/jobs/unknown-job/extra/path", sidecar.token).kind is AnswerKind.UNUSABLE
        # A wrong token is refused, then throttled by address once the bucket (4, 4 a second) is empty.
        kinds = [answer(client, "/jobs/unknown-job", "wrong")]
        while kinds[-1].kind is not AnswerKind.THROTTLED and len(kinds) < 200:
            kinds.append(answer(client, "/jobs/unknown-job", "wrong"))
    assert kinds[0].kind is AnswerKind.UNAUTHORIZED
    assert kinds[-1].kind is AnswerKind.THROTTLED, kinds[-1]
    assert kinds[-1].retry_after is not None and kinds[-1].retry_after >= 1


@pytest.mark.fast
def test_an_event_waits_out_the_settling_time_only_once_and_only_at_first() -> None:
    # A job that ended long after the trigger started fires at once: no settling wait at the end.
    polls = int(RESUME_SETTLE_SECONDS / POLL) + 2
    run = Run(Sidecar(*[job("RUNNING")] * polls, job("SUCCEEDED", rc=0)))
    assert run.event()["status"] == "SUCCEEDED"
    assert run.clock.sleeps == [POLL] * polls


@pytest.mark.fast
def test_a_sidecar_that_moved_is_found_by_reading_the_connection_again() -> None:
    """The sidecar went from http to https (or to another host) after the task deferred: the old
    address refuses connections, and the next try reads the connection again instead of retrying
    the old address for ever."""
    moved = SidecarEndpoint("https://sidecar.test:8790", TOKEN)

    class Moved(Sidecar):
        old_tries = 0

        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.scheme == "http":
                self.old_tries += 1
                assert self.old_tries < 5, "still trying the old address"
                raise httpx.ConnectError("connection refused", request=request)
            return super().__call__(request)

    run = Run(Moved(job("SUCCEEDED", rc=0)), Connection(SidecarEndpoint(BASE, TOKEN), moved))
    assert run.event()["status"] == "SUCCEEDED"
    assert run.connection.calls == 2
    assert [r.url.scheme for r in run.sidecar.requests] == ["https"]
