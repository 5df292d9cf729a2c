"""A battery of bad requests against the real agent and the real sidecar (processes, as in production).

Every case must get a 4xx JSON ``{"error": ...}``, change nothing (the sidecar's job list and the
agent's job directories and job are as before) and leave the service healthy; a 405 names the allowed
methods in ``Allow``. The cases are a table, generated from a few lists of bad bodies, ids, queries,
methods and tokens; the last test checks that all of them ran and prints how many. The sidecar runs on
SQLite; text that no router DB may store (NUL, lone surrogates) is also tried on PostgreSQL, which
refuses NUL where SQLite stores it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from harness.agent import AgentProcess
from harness.airflow import POSTGRES_ADMIN_URL
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess

JOB = "{job}"  # in a path: the id of the job that runs throughout (the same on sidecar and agent)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    id: str
    target: str  # "agent" or "sidecar"
    method: str
    path: str
    body: bytes | None = None
    auth: str | bytes | None = "good"  # "good": the real token; None: no header; else the header value
    expect: int | None = None  # an exact status, or None for "any 4xx"
    names: str | None = None  # what the error message must name (the field), if anything


# Bodies that are not a usable JSON document, whatever the route.
RAW_BODIES: dict[str, bytes] = {
    "empty": b"",
    "truncated": b'{"command": ',
    "not-json": b"{not json",
    "trailing-garbage": b'{"a": 1} x',
    "null": b"null",
    "array": b"[]",
    "string": b'"text"',
    "number": b"42",
    "nan": b"NaN",
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "huge-integer": b'{"try_number": ' + b"9" * 5000 + b"}",
    "invalid-utf8": b'{"command": "\xff\xfe"}',
    "overlong-utf8-slash": b'{"command": "\xc0\xaf"}',
    "surrogate-bytes": b'{"command": "\xed\xa0\x80"}',
    "lone-surrogate-escape": b'{"command": "\\ud800", "dag_id": "\\udfff"}',
    "utf16": '{"command": "x"}'.encode("utf-16"),
    "nul-bytes": b'{"command": "a\x00b"}',
}

BAD_IDS: dict[str, str] = {
    "traversal": "..%2F..%2Fetc%2Fpasswd",
    "dotdot": "..",
    "hidden": ".hidden",
    "overlong": "a" * 129,
    "very-long": "b" * 5000,
    "nul": "a%00b",
    "newline": "abc%0A",
    "space": "a%20b",
    "unicode": "j%C3%B6b",
    "emoji": "%F0%9F%92%A3",
    "surrogate-bytes": "%ED%A0%80",
    "overlong-utf8": "%C0%AF",
    "invalid-utf8": "%FF%FE",
}

TOKENS: dict[str, str | bytes | None] = {
    "missing": None,
    "wrong": "Bearer not-the-token",
    "empty-bearer": "Bearer",
    "basic-scheme": "Basic dXNlcjpwYXNz",
    "non-ascii": b"Bearer \xff\xfe\xc3\xa9",
    "very-long": "Bearer " + "t" * 8000,
}


def _sidecar_submission(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command": "sleep 600",  # outlives the battery; the agent stops it at teardown
        "labels": ["default"],
        "dag_id": "bad_input",
        "task_id": "never",
        "run_id": "manual__1",
        "map_index": -1,
        "try_number": 1,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP: Any = object()


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


NUL = "a\u0000b"
SURROGATE = "a\udcffb"  # what surrogateescape makes of the byte 0xff: not text either


def _nested(field: str, value: str) -> dict[str, Any]:
    """A submission carrying ``value`` in ``field``, or inside it for the list and mapping fields."""
    if field == "labels":
        return {"labels": [value]}
    if field == "env-key":
        return {"env": {value: "1"}}
    if field == "env-value":
        return {"env": {"A": value}}
    return {field: value}


def text_cases() -> list[Case]:
    """Text no router DB can store, in every text field that reaches the router DB or the agent."""
    cases: list[Case] = []
    for bad_name, bad in (("nul", NUL), ("surrogate", SURROGATE)):
        for field in (
            "command", "dag_id", "task_id", "run_id", "agent_id", "labels", "env-key", "env-value",
            "cwd", "run_as",
        ):  # fmt: skip
            body = _j(_sidecar_submission(**_nested(field, bad)))
            named = field.split("-")[0]
            cases.append(
                Case(
                    f"sidecar-submit-{field}-{bad_name}",
                    "sidecar",
                    "POST",
                    "/jobs",
                    body,
                    expect=400,
                    names=named,
                )
            )
        update: dict[str, dict[str, Any]] = {
            "status": {"job_id": JOB, "status": bad},
            "reason": {"job_id": JOB, "status": "failed", "reason": bad},
            **{
                name: {
                    "dag_id": "bad_input",
                    "task_id": "never",
                    "run_id": "r",
                    "status": "failed",
                    name: bad,
                }
                for name in ("dag_id", "task_id", "run_id")
            },
        }
        for name, fields in update.items():
            case_id = f"sidecar-update-{name}-{bad_name}"
            path = "/jobs/update_status"
            cases.append(Case(case_id, "sidecar", "POST", path, _j(fields), expect=400, names=name))
    for name in ("dag_id", "run_id", "status"):  # invalid UTF-8 in a query arrives as U+FFFD: text
        path = f"/jobs?{name}=a%00b"
        cases.append(Case(f"sidecar-query-{name}-nul", "sidecar", "GET", path, expect=400, names=name))
    return cases


def sidecar_cases() -> list[Case]:
    cases: list[Case] = []
    body: bytes | None
    for route in ("/jobs", "/jobs/update_status"):
        for name, body in RAW_BODIES.items():
            cases.append(Case(f"sidecar-POST{route}-{name}", "sidecar", "POST", route, body, expect=400))
        cases.append(
            Case(f"sidecar-POST{route}-huge", "sidecar", "POST", route, b" " * (MIB + 1), expect=413)
        )
    for field in ("command", "dag_id", "task_id", "run_id", "try_number"):
        body = _j(_sidecar_submission(**{field: _DROP}))
        cases.append(Case(f"sidecar-submit-missing-{field}", "sidecar", "POST", "/jobs", body, expect=400))
    wrong: dict[str, Any] = {
        "command-int": {"command": 1},
        "command-blank": {"command": "   "},
        "command-too-big": {"command": "x" * (64 * 1024 + 1)},
        "dag_id-list": {"dag_id": ["a"]},
        "dag_id-empty": {"dag_id": ""},
        "dag_id-overlong": {"dag_id": "d" * 251},
        "try_number-string": {"try_number": "1"},
        "try_number-bool": {"try_number": True},
        "try_number-float": {"try_number": 1.5},
        "try_number-negative": {"try_number": -1},
        "try_number-2**63": {"try_number": 2**63},
        "map_index-below-minus-one": {"map_index": -2},
        "map_index-2**64": {"map_index": 2**64},
        "labels-not-list": {"labels": "default"},
        "labels-ints": {"labels": [1]},
        "labels-unknown": {"labels": ["no-agent-has-this"]},
        "agent_id-unknown": {"agent_id": "no-such-agent"},
        "agent_id-traversal": {"agent_id": "../agent-1"},
        "env-not-dict": {"env": ["A=1"]},
        "env-int-value": {"env": {"A": 1}},
        "timeout-zero": {"timeout_seconds": 0},
        "timeout-negative": {"timeout_seconds": -5},
        "timeout-string": {"timeout_seconds": "10"},
        "timeout-bool": {"timeout_seconds": True},
        "timeout-huge": {"timeout_seconds": 1e300},
        "cwd-int": {"cwd": 5},
        "unicode-valid-but-bad-type": {"dag_id": "dåg ☃ 𝄞", "try_number": "один"},
    }
    for name, override in wrong.items():
        cases.append(
            Case(
                f"sidecar-submit-{name}",
                "sidecar",
                "POST",
                "/jobs",
                _j(_sidecar_submission(**override)),
                expect=400,
            )
        )
    for name, literal in (("nan", b"NaN"), ("infinity", b"Infinity"), ("minus-infinity", b"-Infinity")):
        body = _j(_sidecar_submission(timeout_seconds=0)).replace(
            b'"timeout_seconds": 0', b'"timeout_seconds": ' + literal
        )
        cases.append(Case(f"sidecar-submit-timeout-{name}", "sidecar", "POST", "/jobs", body, expect=400))
    update: dict[str, Any] = {
        "missing-status": {"job_id": JOB},
        "status-int": {"job_id": JOB, "status": 1},
        "status-empty": {"job_id": JOB, "status": ""},
        "status-overlong": {"job_id": JOB, "status": "f" * 33},
        "job_id-int": {"job_id": 5, "status": "failed"},
        "job_id-traversal": {"job_id": "../../etc/passwd", "status": "failed"},
        "job_id-overlong": {"job_id": "a" * 129, "status": "failed"},
        "job_id-newline": {"job_id": "abc\n", "status": "failed"},
        "job_id-unicode": {"job_id": "jöb", "status": "failed"},
        "reason-int": {"job_id": JOB, "status": "failed", "reason": 5},
        "missing-keys": {"dag_id": "bad_input", "status": "failed"},
        "map_index-string": {
            "dag_id": "d",
            "task_id": "t",
            "run_id": "r",
            "map_index": "0",
            "status": "failed",
        },
        "map_index-2**70": {
            "dag_id": "d",
            "task_id": "t",
            "run_id": "r",
            "map_index": 2**70,
            "status": "failed",
        },
        "unknown-job": {"job_id": "no-such-job", "status": "failed"},
    }
    for name, body in update.items():
        cases.append(Case(f"sidecar-update-{name}", "sidecar", "POST", "/jobs/update_status", _j(body)))
    for name, job_id in BAD_IDS.items():
        for suffix in ("", "/log", "/events"):
            cases.append(Case(f"sidecar-GET-id-{name}{suffix}", "sidecar", "GET", f"/jobs/{job_id}{suffix}"))
    queries = {
        "status-bogus": "/jobs?status=BOGUS",
        "status-surrogate": "/jobs?status=%ED%A0%80",
        "limit-text": "/jobs?limit=abc",
        "limit-float": "/jobs?limit=1e999",
        "log-offset-negative": f"/jobs/{JOB}/log?offset=-1",
        "log-offset-huge": f"/jobs/{JOB}/log?offset=99999999999999999999999",
        "log-offset-text": f"/jobs/{JOB}/log?offset=abc",
        "log-limit-zero": f"/jobs/{JOB}/log?limit=0",
        "log-limit-huge": f"/jobs/{JOB}/log?limit=" + "9" * 40,
    }
    for name, path in queries.items():
        cases.append(Case(f"sidecar-query-{name}", "sidecar", "GET", path, expect=400))
    for name in ("status", "dag_id", "run_id"):  # an empty filter is a mistake, not "any"
        path = f"/jobs?{name}="
        cases.append(Case(f"sidecar-query-{name}-empty", "sidecar", "GET", path, expect=400, names=name))
    # A drain's body is optional, but a JSON object when there is one (the agent's flag stays as it is).
    # /undrain reads its body as /drain does: a few of the bodies suffice there.
    for verb, names in (("drain", set(RAW_BODIES) - {"empty"}), ("undrain", {"null", "array", "truncated"})):
        route = f"/agents/agent-1/{verb}"
        for name in sorted(names):  # "empty" is no body: a real drain
            cases.append(
                Case(f"sidecar-POST{route}-{name}", "sidecar", "POST", route, RAW_BODIES[name], expect=400)
            )
        cases.append(
            Case(f"sidecar-POST{route}-huge", "sidecar", "POST", route, b" " * (MIB + 1), expect=413)
        )
    cases.append(Case("sidecar-drain-unknown-agent", "sidecar", "POST", "/agents/agent-9/drain", expect=404))
    methods = [
        ("PUT", "/jobs"), ("DELETE", "/jobs"), ("DELETE", f"/jobs/{JOB}"), ("PATCH", f"/jobs/{JOB}"),
        ("GET", "/jobs/update_status/x"), ("PUT", "/jobs/update_status"), ("POST", f"/jobs/{JOB}/log"),
        ("POST", "/healthz"), ("POST", "/metrics"), ("DELETE", "/readyz"), ("POST", "/agents"),
        ("DELETE", "/agents/agent-1/drain"), ("PUT", "/agents/agent-1/undrain"),
    ]  # fmt: skip
    for method, path in methods:
        expect = 404 if method == "GET" else 405
        cases.append(Case(f"sidecar-method-{method}-{path}", "sidecar", method, path, expect=expect))
    cases.append(Case("sidecar-unknown-route", "sidecar", "GET", "/nope", expect=404))
    for name, header in TOKENS.items():
        for method, path, body in (
            ("POST", "/jobs", _j(_sidecar_submission(task_id="with-bad-token"))),
            ("GET", "/jobs", None),
            ("GET", f"/jobs/{JOB}", None),
            ("POST", "/jobs/update_status", _j({"job_id": JOB, "status": "failed"})),
            ("GET", "/agents", None),
            ("POST", "/agents/agent-1/drain", b"{}"),
        ):
            cases.append(
                Case(f"sidecar-token-{name}-{method}{path}", "sidecar", method, path, body, header, 401)
            )
    return cases


def agent_cases() -> list[Case]:
    cases: list[Case] = []
    body: bytes | None
    for name, body in RAW_BODIES.items():
        cases.append(Case(f"agent-POST/run-{name}", "agent", "POST", "/run", body, expect=400))
    cases.append(Case("agent-POST/run-huge", "agent", "POST", "/run", b" " * (MIB + 1), expect=413))
    for name, body in RAW_BODIES.items():
        if name != "empty":  # an empty stop body means "no options": a real stop
            cases.append(Case(f"agent-POST/stop-{name}", "agent", "POST", f"/stop/{JOB}", body, expect=400))
    run: dict[str, Any] = {
        "missing-job_id": {"payload": {"command": "true"}},
        "missing-payload": {"job_id": "bi-1"},
        "extra-key": {"job_id": "bi-1", "payload": {"command": "true"}, "x": 1},
        "job_id-traversal": {"job_id": "../../tmp/x", "payload": {"command": "true"}},
        "job_id-slash": {"job_id": "a/b", "payload": {"command": "true"}},
        "job_id-overlong": {"job_id": "a" * 129, "payload": {"command": "true"}},
        "job_id-unicode": {"job_id": "jöb", "payload": {"command": "true"}},
        "job_id-int": {"job_id": 7, "payload": {"command": "true"}},
        "job_id-duplicate": {"job_id": JOB, "payload": {"command": "true"}},
        "payload-list": {"job_id": "bi-1", "payload": ["true"]},
        "command-missing": {"job_id": "bi-1", "payload": {}},
        "command-int": {"job_id": "bi-1", "payload": {"command": 1}},
        "command-nul": {"job_id": "bi-1", "payload": {"command": "a\u0000b"}},
        "cwd-relative": {"job_id": "bi-1", "payload": {"command": "true", "cwd": "tmp"}},
        "env-int-value": {"job_id": "bi-1", "payload": {"command": "true", "env": {"A": 1}}},
        "timeout-negative": {"job_id": "bi-1", "payload": {"command": "true", "timeout_seconds": -1}},
        "timeout-string": {"job_id": "bi-1", "payload": {"command": "true", "timeout_seconds": "9"}},
        "payload-extra": {"job_id": "bi-1", "payload": {"command": "true", "shell": "bash"}},
        "command-surrogate": {"job_id": "bi-1", "payload": {"command": SURROGATE}},
        "env-key-surrogate": {"job_id": "bi-1", "payload": {"command": "true", "env": {SURROGATE: "1"}}},
        "cwd-surrogate": {"job_id": "bi-1", "payload": {"command": "true", "cwd": "/" + SURROGATE}},
        "unicode-valid-but-bad-type": {"job_id": "bi-1", "payload": {"command": "écho ☃", "env": ["𝄞"]}},
    }
    for name, body in run.items():
        cases.append(Case(f"agent-run-{name}", "agent", "POST", "/run", _j(body)))
    for name, literal in (("nan", b"NaN"), ("infinity", b"Infinity")):
        body = b'{"job_id": "bi-1", "payload": {"command": "true", "timeout_seconds": ' + literal + b"}}"
        cases.append(Case(f"agent-run-timeout-{name}", "agent", "POST", "/run", body, expect=400))
    stop: dict[str, Any] = {
        "force-string": {"force": "yes"},
        "reason-int": {"reason": 5},
        "reason-overlong": {"reason": "r" * 2001},
        "reason-nul": {"reason": NUL},
        "reason-surrogate": {"reason": SURROGATE},
        "extra-key": {"force": True, "now": True},
    }
    for name, body in stop.items():
        cases.append(Case(f"agent-stop-{name}", "agent", "POST", f"/stop/{JOB}", _j(body), expect=400))
    # The body is optional, but a JSON object when there is one; /undrain reads it as /drain does.
    for route, names in (
        ("/drain", set(RAW_BODIES) - {"empty"}),
        ("/undrain", {"null", "array", "truncated"}),
    ):
        for name in sorted(names):  # "empty" is no body: a real drain
            cases.append(
                Case(f"agent-POST{route}-{name}", "agent", "POST", route, RAW_BODIES[name], expect=400)
            )
        cases.append(Case(f"agent-POST{route}-huge", "agent", "POST", route, b" " * (MIB + 1), expect=413))
    for name, job_id in BAD_IDS.items():
        cases.append(Case(f"agent-GET-id-{name}", "agent", "GET", f"/jobs/{job_id}"))
        cases.append(Case(f"agent-GET-log-{name}", "agent", "GET", f"/jobs/{job_id}/log"))
        cases.append(Case(f"agent-POST-stop-{name}", "agent", "POST", f"/stop/{job_id}", b"{}"))
    for param in ("offset", "limit"):
        for name, query in (
            ("negative", "-1"), ("text", "abc"), ("huge", "9" * 40), ("19-digits", "1" + "0" * 18),
            ("float", "1.5"), ("plus", "%2B1"), ("superscript", "%C2%B2"), ("nul", "1%00"),
        ):  # fmt: skip
            path = f"/jobs/{JOB}/log?{param}={query}"
            cases.append(Case(f"agent-log-{param}-{name}", "agent", "GET", path, expect=400, names=param))
    methods = [
        ("GET", "/run"), ("PUT", "/run"), ("DELETE", f"/jobs/{JOB}"), ("PATCH", f"/jobs/{JOB}/log"),
        ("GET", f"/stop/{JOB}"), ("DELETE", f"/stop/{JOB}"), ("POST", "/health"), ("GET", "/drain"),
        ("PUT", "/undrain"),
    ]  # fmt: skip
    for method, path in methods:
        cases.append(Case(f"agent-method-{method}-{path}", "agent", method, path, expect=405))
    cases.append(Case("agent-unknown-route", "agent", "GET", "/nope", expect=404))
    for name, header in TOKENS.items():
        for method, path, body in (
            ("POST", "/run", _j({"job_id": "bi-token", "payload": {"command": "true"}})),
            ("GET", f"/jobs/{JOB}", None),
            ("GET", f"/jobs/{JOB}/log", None),
            ("POST", f"/stop/{JOB}", b"{}"),
            ("POST", "/drain", b"{}"),
            ("POST", "/undrain", b"{}"),
        ):
            cases.append(Case(f"agent-token-{name}-{method}{path}", "agent", method, path, body, header, 401))
    return cases


TEXT_CASES = text_cases()
CASES = sidecar_cases() + TEXT_CASES + agent_cases()
ATTEMPTED: set[str] = set()
PASSED: set[str] = set()


@dataclass
class Stand:
    agent: AgentProcess
    sidecar: SidecarProcess
    job_id: str

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a bad request must not change."""
        with self.sidecar.client() as client:
            jobs = sorted((j["job_id"], j["status"], j["rc"]) for j in client.get("/jobs").json()["jobs"])
            events = len(client.get(f"/jobs/{self.job_id}/events").json()["events"])
        job_dirs = sorted(p.name for p in (self.agent.home / "jobs").iterdir())
        with httpx.Client(base_url=self.agent.url, headers=self.agent_auth, timeout=10) as client:
            agent_job = client.get(f"/jobs/{self.job_id}").json()
            draining = client.get("/healthz").json()["draining"]
        return jobs, events, job_dirs, agent_job["status"], agent_job["pid"], draining

    @property
    def agent_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.agent.token}"}


@contextmanager
def _running_stand(root: Path, db_url: str = "") -> Iterator[Stand]:
    """An agent and a sidecar (router DB at ``db_url``, default SQLite) with one job running."""
    with AgentProcess(home=root / "agent", agent_id="agent-1", grace_seconds=1.0) as agent:
        nowhere = f"http://127.0.0.1:{free_port()}"  # Airflow unreachable: the loop never stops anything
        with SidecarProcess(
            workdir=root / "sidecar",
            airflow_url=nowhere,
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            db_url=db_url,
            interval_seconds=0.5,
        ) as sidecar:
            with sidecar.client() as client:
                answer = client.post("/jobs", json=_sidecar_submission(task_id="the-running-one"))
                assert answer.status_code == 201, answer.text
                job_id = answer.json()["job_id"]
            yield Stand(agent, sidecar, job_id)


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    with _running_stand(tmp_path_factory.mktemp("bad-input")) as running:
        yield running


@pytest.fixture(scope="module")
def postgres_stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    """The same stand with its router DB in a fresh database on the PostgreSQL server."""
    name = f"agentic_bad_input_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        with _running_stand(tmp_path_factory.mktemp("bad-input-postgres"), url) as running:
            yield running
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _send(stand: Stand, case: Case) -> httpx.Response:
    server = stand.agent if case.target == "agent" else stand.sidecar
    token = server.token
    headers: dict[bytes, bytes] = {}  # bytes: a bad token may be bytes no text encodes to
    if case.auth == "good":
        headers[b"Authorization"] = f"Bearer {token}".encode()
    elif case.auth is not None:
        headers[b"Authorization"] = case.auth if isinstance(case.auth, bytes) else case.auth.encode()
    if case.body is not None:
        headers[b"Content-Type"] = b"application/json"
    url = server.url + case.path.replace(JOB, stand.job_id)
    with httpx.Client(timeout=30) as client:
        request = client.build_request(case.method, url, headers=headers, content=case.body)
        return client.send(request)


def _check_refused(stand: Stand, case: Case) -> None:
    before = stand.snapshot()
    response = _send(stand, case)
    shown = f"{case.method} {case.path} -> {response.status_code} {response.text[:300]!r}"
    assert 400 <= response.status_code < 500, shown
    if case.expect is not None:
        assert response.status_code == case.expect, shown
    assert response.headers.get("content-type", "").startswith("application/json"), shown
    body = response.json()
    assert isinstance(body, dict), shown
    # {"error": ...}, or update_status's documented answer for a job it cannot find ({"ok": false, ...})
    message = body.get("error") or (body.get("message") if body.get("ok") is False else None)
    assert isinstance(message, str) and message, shown
    if case.names is not None:
        assert case.names in message, f"{shown}: the message does not name {case.names!r}"
    if response.status_code == 405:
        allowed = response.headers.get("Allow", "").split(",")
        assert allowed != [""] and case.method not in allowed, f"{shown}: Allow {allowed}"
    assert stand.snapshot() == before, f"{shown}: state changed"
    for url in (f"{stand.agent.url}/health", f"{stand.sidecar.url}/healthz"):
        assert httpx.get(url, timeout=10).status_code == 200, f"{shown}: {url} not healthy after"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_gets_a_json_4xx_and_changes_nothing(stand: Stand, case: Case) -> None:
    ATTEMPTED.add(case.id)
    _check_refused(stand, case)
    PASSED.add(case.id)


@pytest.mark.parametrize("case", TEXT_CASES, ids=[c.id for c in TEXT_CASES])
def test_text_no_router_db_can_store_is_refused_on_postgresql_too(postgres_stand: Stand, case: Case) -> None:
    """PostgreSQL refuses NUL in text (SQLite stores it): it must never get that far."""
    _check_refused(postgres_stand, case)


@dataclass(frozen=True)
class PageCase:
    """A bad request to the read-only pages under /ui/ (HTML: a 4xx page, or the login form's 303)."""

    id: str
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


def page_cases() -> list[PageCase]:
    good = ((b"Authorization", b"Bearer {token}"),)
    form = ((b"Content-Type", b"application/x-www-form-urlencoded"),)
    cases = [
        PageCase(f"page-id-{name}", "GET", f"/ui/jobs/{job_id}", headers=good)
        for name, job_id in BAD_IDS.items()
    ]
    queries = {
        "status-bogus": "status=BOGUS",
        "status-twice": "status=FAILED&status=QUEUED",
        "dag_id-nul": "dag_id=a%00b",
        "dag_id-overlong": "dag_id=" + "d" * 251,
    }
    cases += [
        PageCase(f"page-query-{name}", "GET", f"/ui/jobs?{q}", headers=good) for name, q in queries.items()
    ]
    cases += [
        PageCase(f"page-login-{name}", "POST", "/ui/login", body, form) for name, body in RAW_BODIES.items()
    ]
    cases.append(PageCase("page-login-huge", "POST", "/ui/login", b"token=" + b"x" * MIB, form))
    for name, header in TOKENS.items():
        value = header if isinstance(header, bytes) else (header or "").encode()
        cases.append(PageCase(f"page-token-{name}", "GET", "/ui/jobs", headers=((b"Authorization", value),)))
    for name, cookie in {
        "forged": b"agentic_session=forged",
        "very-long": b"agentic_session=" + b"c" * 8000,
        "non-ascii": b"agentic_session=\xff\xfe\xc3\xa9",
        "malformed": b";;=;agentic_session",
    }.items():
        cases.append(
            PageCase(f"page-cookie-{name}", "GET", f"/ui/jobs/{JOB}", headers=((b"Cookie", cookie),))
        )
    return cases


PAGE_CASES = page_cases()


@pytest.mark.parametrize("case", PAGE_CASES, ids=[c.id for c in PAGE_CASES])
def test_bad_page_requests_get_an_html_4xx_or_the_login_form_and_change_nothing(
    stand: Stand, case: PageCase
) -> None:
    token = stand.sidecar.token
    before = stand.snapshot()
    headers = {name: value.replace(b"{token}", token.encode()) for name, value in case.headers}
    with httpx.Client(timeout=30) as client:
        request = client.build_request(
            case.method,
            stand.sidecar.url + case.path.replace(JOB, stand.job_id),
            headers=headers,
            content=case.body,
        )
        response = client.send(request)
    shown = f"{case.method} {case.path[:80]} -> {response.status_code} {response.text[:300]!r}"
    assert response.status_code == 303 or 400 <= response.status_code < 500, shown
    if response.status_code == 303:
        assert response.headers["Location"].startswith("/ui/login"), shown
    if response.headers.get("content-type", "").startswith("application/json"):  # a path no page serves
        assert response.status_code == 404 and response.json()["error"], shown
    else:
        assert response.headers.get("content-type", "").startswith("text/html"), shown
    assert token not in response.text, shown
    assert stand.snapshot() == before, f"{shown}: state changed"
    assert httpx.get(f"{stand.sidecar.url}/healthz", timeout=10).status_code == 200, f"{shown}: not healthy"


def _log(stand: Stand, query: str) -> httpx.Response:
    """The agent's answer to ``GET /jobs/<the running job>/log?<query>``."""
    return _send(stand, Case("log", "agent", "GET", f"/jobs/{JOB}/log?{query}"))


@pytest.mark.parametrize(
    "offset",
    [1, 1000, 2**31 - 1, 17_592_186_040_321, 10**18 - 1],  # 17592186040321: past ext4's largest file
)
def test_agent_log_from_past_its_end_is_an_empty_chunk(stand: Stand, offset: int) -> None:
    """A client paging with X-Next-Offset keeps its place: the next offset is the one it asked for."""
    size = int(_log(stand, "").headers["X-Log-Size"])
    for limit in ("", "&limit=0", "&limit=1", f"&limit={10**18 - 1}"):
        response = _log(stand, f"offset={size + offset}{limit}")
        shown = f"offset={size + offset}{limit} -> {response.status_code} {response.text[:300]!r}"
        assert response.status_code == 200, shown
        assert response.content == b"", shown
        assert response.headers["X-Log-Size"] == str(size), shown
        assert response.headers["X-Next-Offset"] == str(size + offset), shown


def test_agent_log_limit_extremes(stand: Stand) -> None:
    """limit=0 reads nothing and stays put; the largest limit accepted reads the whole log."""
    empty = _log(stand, "offset=0&limit=0")
    assert (empty.status_code, empty.content, empty.headers["X-Next-Offset"]) == (200, b"", "0")
    whole = _log(stand, f"limit={10**18 - 1}")
    assert whole.status_code == 200, whole.text
    assert whole.headers["X-Next-Offset"] == whole.headers["X-Log-Size"] == str(len(whole.content))


def test_the_battery_leaves_no_job_behind_but_the_running_one(stand: Stand) -> None:
    """After every case: one job in the router DB, one job directory on the agent, still running."""
    jobs, _, job_dirs, status, _, draining = stand.snapshot()
    assert [j[0] for j in jobs] == [stand.job_id] and job_dirs == [stand.job_id], (jobs, job_dirs)
    assert status == "RUNNING" and draining is False
    assert not list(Path(stand.agent.home).glob("jobs/bi-*"))


def test_zz_every_bad_input_case_ran_and_passed(capsys: pytest.CaptureFixture[str]) -> None:
    if len(ATTEMPTED) < len(CASES):
        pytest.skip(f"only {len(ATTEMPTED)} of {len(CASES)} bad-input cases selected")
    assert PASSED == ATTEMPTED, sorted(ATTEMPTED - PASSED)
    by_target = {t: sum(c.target == t for c in CASES) for t in ("agent", "sidecar")}
    assert len(CASES) >= 250, len(CASES)
    with capsys.disabled():
        print(
            f"\nbad-input cases: {len(CASES)} passed "
            f"({by_target['agent']} agent, {by_target['sidecar']} sidecar)"
        )
