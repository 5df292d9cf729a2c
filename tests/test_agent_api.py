"""The agent's HTTP surface against a real agent process: auth and a battery of bad requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from harness.agent import AgentProcess

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    home = tmp_path_factory.mktemp("agent-api") / "home"
    with AgentProcess(home, token="api-secret-token-1234", max_body_bytes=MAX_BODY) as proc:
        yield proc


def request(
    agent: AgentProcess,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    auth: bool = True,
) -> tuple[int, bytes]:
    async def main() -> tuple[int, bytes]:
        all_headers = {"Authorization": f"Bearer {agent.token}"} if auth else {}
        all_headers |= headers or {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, agent.url + path, data=body, headers=all_headers) as response,
        ):
            return response.status, await response.read()

    return asyncio.run(main())


def job_dirs(agent: AgentProcess) -> set[str]:
    root = agent.home / "jobs"
    return {path.name for path in root.iterdir()} if root.exists() else set()


def run_body(job_id: object = "ok-job", **payload: object) -> bytes:
    return json.dumps({"job_id": job_id, "payload": {"command": "true", **payload}}).encode()


# ------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/run"), ("GET", "/jobs/some-job"), ("GET", "/jobs/some-job/log"), ("POST", "/stop/some-job")],
)
def test_requests_without_a_valid_token_get_401(agent: AgentProcess, method: str, path: str) -> None:
    body = run_body() if path == "/run" else b"{}"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {agent.token}"},
        {"X-Agent-Token": "wrong-token"},
        {"Authorization": "Bearer "},
    ):
        status, answer = request(agent, method, path, body=body, headers=headers, auth=False)
        assert status == 401, headers
        assert "token" in json.loads(answer)["error"]
        assert agent.token not in answer.decode()
    assert "ok-job" not in job_dirs(agent)


def test_x_agent_token_header_is_accepted(agent: AgentProcess) -> None:
    status, answer = request(
        agent, "GET", "/jobs/nobody-ran-this", headers={"X-Agent-Token": agent.token}, auth=False
    )
    assert status == 404
    assert "nobody-ran-this" in json.loads(answer)["error"]


def test_health_needs_no_token(agent: AgentProcess) -> None:
    status, answer = request(agent, "GET", "/health", auth=False)
    assert status == 200
    health = json.loads(answer)
    assert health == {
        "status": "ok",
        "agent_id": "test-agent",
        "jobs_running": 0,
        "max_jobs": 0,
        "draining": False,
        "maintenance": None,
        "unwell": None,
        "version": health["version"],
        "fence": {"after_seconds": 60.0, "grace_seconds": 0.5, "default": False},
        "jobs_retained": health["jobs_retained"],
        "retained_bytes": health["retained_bytes"],
    }
    assert health["version"] and health["jobs_retained"] >= 0 and health["retained_bytes"] >= 0


# ---------------------------------------------------------------------------------------- bad input

BAD_RUNS: list[tuple[str, bytes, int, str]] = [
    ("malformed JSON", b'{"job_id": "x", "payload": {', 400, "not valid JSON"),
    ("empty body", b"", 400, "empty"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 413, "max_body_bytes"),
    ("nesting under the limit", b"[" * 30_000 + b"]" * 30_000, 400, "not valid JSON"),
    ("not UTF-8", b'{"job_id": "\xff\xfe"}', 400, "not valid JSON"),
    ("job_id missing", json.dumps({"payload": {"command": "true"}}).encode(), 400, "job_id is missing"),
    ("payload missing", json.dumps({"job_id": "a"}).encode(), 400, "payload is missing"),
    ("unknown key", json.dumps({"job_id": "a", "payload": {"command": "x"}, "x": 1}).encode(), 400, "'x'"),
    ("job_id not a string", run_body(job_id=12), 400, "job_id must be a string"),
    ("job_id path traversal", run_body(job_id="../etc"), 400, "job_id"),
    ("job_id with slash", run_body(job_id="a/b"), 400, "job_id"),
    ("job_id hidden", run_body(job_id=".hidden"), 400, "job_id"),
    ("job_id empty", run_body(job_id=""), 400, "job_id"),
    ("job_id overlong", run_body(job_id="a" * 129), 400, "job_id"),
    ("job_id with NUL", run_body(job_id="a\0b"), 400, "job_id"),
    ("job_id non-ASCII", run_body(job_id="jöb"), 400, "job_id"),
    ("command missing", json.dumps({"job_id": "a", "payload": {}}).encode(), 400, "payload.command"),
    ("command blank", run_body(command="  "), 400, "payload.command"),
    ("command not a string", run_body(command=["ls"]), 400, "payload.command"),
    ("command with NUL", run_body(command="true\0"), 400, "NUL"),
    ("cwd relative", run_body(cwd="tmp"), 400, "payload.cwd"),
    ("cwd missing directory", run_body(cwd="/no/such/dir"), 400, "payload.cwd"),
    ("cwd wrong type", run_body(cwd=5), 400, "payload.cwd"),
    ("env not an object", run_body(env=["A=1"]), 400, "payload.env"),
    ("env value not a string", run_body(env={"A": 1}), 400, "payload.env"),
    ("env name with =", run_body(env={"A=B": "1"}), 400, "payload.env"),
    ("run_as wrong type", run_body(run_as=0), 400, "payload.run_as"),
    ("timeout negative", run_body(timeout_seconds=-1), 400, "timeout_seconds"),
    ("timeout zero", run_body(timeout_seconds=0), 400, "timeout_seconds"),
    ("timeout a string", run_body(timeout_seconds="10"), 400, "timeout_seconds"),
    ("timeout a bool", run_body(timeout_seconds=True), 400, "timeout_seconds"),
    (
        "timeout NaN",
        b'{"job_id": "a", "payload": {"command": "true", "timeout_seconds": NaN}}',
        400,
        "timeout",
    ),
    ("payload unknown key", run_body(timeout=5), 400, "'timeout'"),
    ("huge body", run_body(command="x" * (MAX_BODY * 3)), 413, "max_body_bytes"),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_RUNS, ids=[case[0] for case in BAD_RUNS])
def test_bad_run_requests_are_rejected_without_a_trace(
    agent: AgentProcess, case: str, body: bytes, status: int, message: str
) -> None:
    before = job_dirs(agent)
    got, answer = request(agent, "POST", "/run", body=body, headers={"Content-Type": "application/json"})
    assert got == status, answer
    assert message in json.loads(answer)["error"]
    assert job_dirs(agent) == before
    assert request(agent, "GET", "/health", auth=False)[0] == 200


def test_huge_body_without_content_length_is_rejected_with_413(agent: AgentProcess) -> None:
    async def main() -> int:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"x" * MAX_BODY

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                agent.url + "/run", data=chunks(), headers={"Authorization": f"Bearer {agent.token}"}
            ) as response,
        ):
            return response.status

    before = job_dirs(agent)
    assert asyncio.run(main()) == 413
    assert job_dirs(agent) == before


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("GET", "/jobs/unknown-job", None, 404, "unknown-job"),
        ("GET", "/jobs/unknown-job/log", None, 404, "unknown-job"),
        ("GET", "/jobs/..%2Fetc", None, 400, "job_id"),
        ("GET", "/jobs/.hidden", None, 400, "job_id"),
        ("GET", "/jobs/" + "a" * 129, None, 400, "job_id"),
        ("POST", "/stop/" + "a" * 129, b"{}", 400, "job_id"),
        ("POST", "/stop/some-job", b'{"force": "yes"}', 400, "force"),
        ("POST", "/stop/some-job", b'{"reason": 5}', 400, "reason"),
        ("POST", "/stop/some-job", b'{"signal": "KILL"}', 400, "'signal'"),
        ("POST", "/stop/some-job", b"{not json", 400, "not valid JSON"),
        ("GET", "/jobs/some-job/log?offset=-1", None, 400, "offset"),
        ("GET", "/jobs/some-job/log?limit=lots", None, 400, "limit"),
        ("GET", "/jobs/some-job/log?offset=%C2%B2", None, 400, "offset"),
        ("GET", "/no/such/route", None, 404, ""),
        ("DELETE", "/run", None, 405, ""),
    ],
)
def test_bad_job_requests_get_a_json_error(
    agent: AgentProcess, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    got, answer = request(agent, method, path, body=body)
    assert got == status, answer
    assert message in json.loads(answer)["error"]


def test_duplicate_run_is_409_and_leaves_the_first_job_alone(agent: AgentProcess) -> None:
    first = run_body(job_id="dup-job", command="sleep 300")
    assert request(agent, "POST", "/run", body=first)[0] == 201
    status, answer = request(agent, "POST", "/run", body=run_body(job_id="dup-job", command="exit 7"))
    assert status == 409 and "already exists" in json.loads(answer)["error"]
    status, answer = request(agent, "GET", "/jobs/dup-job")
    assert json.loads(answer)["status"] == "RUNNING"
    status, answer = request(agent, "POST", "/stop/dup-job", body=b"")  # an empty body means defaults
    assert (status, json.loads(answer)["action"]) == (200, "terminated")


def test_the_token_never_appears_in_the_agent_log(agent: AgentProcess) -> None:
    request(agent, "GET", "/jobs/any", headers={"X-Agent-Token": agent.token}, auth=False)
    request(agent, "GET", "/jobs/any", headers={"Authorization": f"Bearer {agent.token}x"}, auth=False)
    log = agent.log_text()
    assert "GET /jobs/any" in log
    assert agent.token not in log
