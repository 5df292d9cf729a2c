"""Both services stand on :mod:`servicekit`: the same bad request gets the same answer from each.

The agent's and the sidecar's real applications are served in-process (no Airflow is asked: every
request here is refused before a handler would reach it, or is a health check).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.config import load_config as load_agent_config
from agent.jobs import JobManager
from agent.server import create_app
from reconciler.api.server import SidecarAPI
from reconciler.config import load_secrets, parse_config
from reconciler.service import build

pytestmark = pytest.mark.fast

TOKEN = "foundation-token-1"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Service:
    name: str
    submit: str  # the route that takes a JSON body
    make_app: Callable[[Path], web.Application]


def agent_app(tmp: Path) -> web.Application:
    config = load_agent_config(None, environ={"AGENTIC_AGENT_TOKEN": TOKEN, "AGENTIC_AGENT_HOME": str(tmp)})
    return create_app(config, JobManager(config))


def sidecar_app(tmp: Path) -> web.Application:
    config = parse_config({"router_db": {"url": f"sqlite:///{tmp / 'router.db'}"}}, {})
    secrets = load_secrets(config, {"AIRFLOW_PASSWORD": "pw", "AGENTIC_SIDECAR_TOKEN": TOKEN})
    parts = build(config, secrets)
    jobs = parts.job_service()
    api = SidecarAPI(
        jobs=jobs,
        db=parts.db,
        metrics=parts.metrics,
        loop=parts.loop,
        fleet=parts.fleet,
        tokens=[TOKEN],
        ready_after=1,
    )
    return api.app()


SERVICES = [Service("agent", "/run", agent_app), Service("sidecar", "/jobs", sidecar_app)]


@asynccontextmanager
async def served(service: Service, tmp: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(service.make_app(tmp))) as client:
        yield client


async def answer(
    service: Service, tmp: Path, method: str, path: str, *, body: bytes | None = None, auth: str | None = None
) -> tuple[int, dict[str, object], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    async with served(service, tmp) as client:
        response = await client.request(method, path, data=body, headers=headers)
        text = await response.text()
        return response.status, json.loads(text), dict(response.headers)


BEARER = f"Bearer {TOKEN}"
CASES = [
    # (name, method, path or None for the service's JSON route, body, auth, status, words in the error)
    ("no token", "POST", None, b"{}", None, 401, "missing or wrong token"),
    ("wrong token", "POST", None, b"{}", "Bearer nope", 401, "missing or wrong token"),
    ("empty bearer", "POST", None, b"{}", "Bearer ", 401, "missing or wrong token"),
    ("not JSON", "POST", None, b"{nope", BEARER, 400, "not valid JSON"),
    ("not UTF-8", "POST", None, b'{"a": "\xff"}', BEARER, 400, "not valid JSON"),
    ("empty body", "POST", None, b"", BEARER, 400, "empty"),
    ("NUL", "POST", None, b'{"command": "a\\u0000b"}', BEARER, 400, "NUL"),
    ("lone surrogate", "POST", None, b'{"\\ud800": 1}', BEARER, 400, "lone surrogate"),
    ("too deep", "POST", None, b"[" * 100_000 + b"]" * 100_000, BEARER, 400, "not valid JSON"),
    ("too large", "POST", None, b" " * (MIB + 1), BEARER, 413, "larger than"),
    ("method", "DELETE", None, None, BEARER, 405, "not allowed"),
    ("unknown route", "GET", "/nowhere", None, BEARER, 404, "Not Found"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_same_bad_request_gets_the_same_answer_from_both_services(
    tmp_path: Path, case: tuple[str, str, str | None, bytes | None, str | None, int, str]
) -> None:
    _, method, path, body, auth, status, words = case
    seen = {}
    for service in SERVICES:
        home = tmp_path / service.name
        home.mkdir()
        got, answer_body, headers = asyncio.run(
            answer(service, home, method, path or service.submit, body=body, auth=auth)
        )
        assert got == status, (service.name, answer_body)
        assert list(answer_body) == ["error"] and words in str(answer_body["error"]), (
            service.name,
            answer_body,
        )
        assert TOKEN not in str(answer_body)
        if status == 405:
            route = path or service.submit
            expected = f"method {method} not allowed on {route}; allowed: {headers['Allow']}"
            assert "POST" in headers["Allow"] and answer_body["error"] == expected
        seen[service.name] = answer_body["error"]
    if status == 413:  # nothing service-specific in it: word for word the same
        assert seen["agent"] == seen["sidecar"]


def test_the_bearer_scheme_is_accepted_in_any_case(tmp_path: Path) -> None:
    for service in SERVICES:
        for scheme in ("Bearer", "bearer", "BEARER"):
            home = tmp_path / f"{service.name}-{scheme}"
            home.mkdir()
            got, body, _ = asyncio.run(
                answer(service, home, "POST", service.submit, body=b"{}", auth=f"{scheme} {TOKEN}")
            )
            assert got == 400, (service.name, scheme, body)  # past auth: the empty object is refused


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_both_services_answer_health_probes_without_a_token(tmp_path: Path, path: str) -> None:
    for service in SERVICES:
        home = tmp_path / service.name
        home.mkdir()
        got, body, _ = asyncio.run(answer(service, home, "GET", path))
        assert got in (200, 503) and "status" in body, (service.name, body)
        assert got == 200 or path == "/readyz"  # the sidecar has run no cycle yet: not ready


def test_the_agent_keeps_health_as_an_alias_and_is_not_ready_when_its_home_is_not_writable(
    tmp_path: Path,
) -> None:
    got, body, _ = asyncio.run(answer(SERVICES[0], tmp_path, "GET", "/health"))
    assert (got, body["status"]) == (200, "ok")
    got, body, _ = asyncio.run(answer(SERVICES[0], tmp_path, "GET", "/readyz"))
    assert (got, body["status"]) == (200, "ready")
    gone = tmp_path / "gone"
    gone.mkdir()
    app_home = gone / "home"
    app_home.mkdir()

    def broken_agent(_: Path) -> web.Application:
        app = agent_app(app_home)
        app_home.rmdir()  # the disk went away under the agent
        return app

    got, body, _ = asyncio.run(answer(Service("agent", "/run", broken_agent), app_home, "GET", "/readyz"))
    assert got == 503 and body["status"] == "not ready" and "not writable" in str(body["problems"])


def test_both_configs_refuse_a_secret_in_the_file_and_name_the_key_the_same_way(tmp_path: Path) -> None:
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text('[agent]\ntoken = "s3cret-value"\n')
    with pytest.raises(ValueError) as agent_error:
        load_agent_config(agent_toml, environ={"AGENTIC_AGENT_TOKEN": TOKEN})
    with pytest.raises(ValueError) as sidecar_error:
        parse_config({"http": {"token": "s3cret-value"}}, {})
    for error, table in ((agent_error, "agent"), (sidecar_error, "http")):
        assert str(error.value).startswith(f"[{table}] token: must not be in the config file")
        assert "s3cret-value" not in str(error.value)


def test_both_configs_name_the_environment_variable_of_a_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^\[agent\] port \(from AGENTIC_AGENT_PORT\): must be an integer"):
        load_agent_config(None, environ={"AGENTIC_AGENT_TOKEN": TOKEN, "AGENTIC_AGENT_PORT": "eighty"})
    with pytest.raises(
        ValueError, match=r"^\[http\] port \(from AGENTIC_RECONCILER_HTTP_PORT\): must be an integer"
    ):
        parse_config({}, {"AGENTIC_RECONCILER_HTTP_PORT": "eighty"})
    with pytest.raises(ValueError, match=r"^\[poll\] interval_seconds: must be > 0, got 0"):
        parse_config({"poll": {"interval_seconds": 0}}, {})
    with pytest.raises(
        ValueError, match=r"^\[agent\] poll_seconds \(from AGENTIC_AGENT_POLL_SECONDS\): must be > 0"
    ):
        load_agent_config(None, environ={"AGENTIC_AGENT_TOKEN": TOKEN, "AGENTIC_AGENT_POLL_SECONDS": "0"})


@pytest.mark.fast
def test_a_listener_reachable_beyond_loopback_without_tls_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from aiohttp import web as aioweb

    from harness.processes import free_port
    from servicekit import serve

    assert not any(serve.beyond_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert all(serve.beyond_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "vm-01.example.internal"))

    async def listen() -> None:
        async with serve.serving(aioweb.Application(), host="127.0.0.1", port=free_port(), ssl_context=None):
            pass

    with caplog.at_level("WARNING", logger="servicekit.serve"):
        asyncio.run(listen())  # loopback: nothing to say
        assert not caplog.records
        # Tests listen on loopback only: the address is taken for one reachable from elsewhere.
        monkeypatch.setattr(serve, "beyond_loopback", lambda host: True)
        asyncio.run(listen())
    (record,) = caplog.records
    assert "without TLS" in record.getMessage() and "clear text" in record.getMessage()
