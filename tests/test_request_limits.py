"""Requests too big or malformed to parse are refused by both services without their token reaching a
log line, and query parameters repeated past their bound are answered in the JSON error shape, as
docs/openapi-*.yaml document; the service answers the next request.

A real agent and a real sidecar (processes, as in production) are sent raw bytes over TCP: a path
and query past 16 KiB, a header past 8,190 bytes carrying a token, 200 headers and request lines
that are not HTTP (which aiohttp cannot parse: servicekit.serve answers them in JSON), and a query
parameter given 500 times (servicekit.http.bounded_query).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from harness.agent import AgentProcess
from harness.served import ServedAirflow
from harness.sidecar import SidecarProcess
from servicekit.http import MAX_HEADER_BYTES, MAX_HEADERS, MAX_QUERY_VALUES, MAX_TARGET_BYTES
from tests.test_openapi import DOCS, Spec

SERVICES = ["agent", "sidecar"]
SECRET = "request-limits-secret-7d1f"  # sent in an over-long header: never to be seen again


class Served:
    """A running service: its port, its token, its log, and its API document."""

    def __init__(self, name: str, port: int, token: str, log: Path) -> None:
        self.name, self.port, self.token, self.log = name, port, token, log
        self.spec = Spec(DOCS / f"openapi-{name}.yaml")

    def exchange(self, raw: bytes) -> httpx.Response:
        """Send ``raw`` on a new connection and read the answer until the service closes it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as connection:
            connection.sendall(raw)
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines)
        headers = [(name.strip(), value.strip()) for name, _, value in fields]
        request = httpx.Request("GET", f"http://127.0.0.1:{self.port}/")
        return httpx.Response(int(status_line.split()[1]), headers=headers, content=body, request=request)

    def get(self, target: str, *headers: str) -> httpx.Response:
        lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
        return self.exchange(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def refused(self, response: httpx.Response, status: int, documented: str, *words: str) -> str:
        """Assert ``response`` is the JSON error ``status`` documented as components/responses/
        ``documented``, naming ``words``, quoting no secret; and that the service still answers."""
        what = f"{self.name}: {response.status_code} {response.text[:200]!r}"
        assert response.status_code == status, what
        assert response.headers["Content-Type"].startswith("application/json"), what
        self.spec.check_answer(response, [], {"$ref": f"#/components/responses/{documented}"}, what)
        body: Any = response.json()
        assert list(body) == ["error"], what
        for word in words:
            assert word in body["error"], what
        assert SECRET not in response.text and self.token not in response.text, what
        healthz = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=10)
        assert healthz.status_code == 200, f"{self.name} no longer answers /healthz: {healthz.text}"
        message: str = body["error"]
        return message


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    airflow = ServedAirflow()
    airflow.start()
    try:
        with (
            AgentProcess(tmp_path_factory.mktemp("agent") / "home") as agent,
            SidecarProcess(
                workdir=tmp_path_factory.mktemp("sidecar"),
                airflow_url=airflow.url,
                airflow_password="unused",
                agents=[],
                api_version="v2",
            ) as sidecar,
        ):
            yield {
                "agent": Served("agent", agent.port, agent.token, agent.log_path),
                "sidecar": Served("sidecar", sidecar.port, sidecar.token, sidecar.log_path),
            }
    finally:
        airflow.stop()


@pytest.mark.parametrize("name", SERVICES)
def test_requests_past_the_parsers_limits_are_refused_and_log_no_token(
    services: dict[str, Served], name: str
) -> None:
    """A path and query past 16 KiB, a header past 8,190 bytes carrying a token, 200 headers and a
    request line that is not HTTP are refused in the documented JSON shape, which names the limit and
    quotes nothing of the request; the token reaches no log line, and the service answers the next
    request. A path longer than aiohttp's own 8,190 bytes, within the bound, is served."""
    service = services[name]
    token = SECRET + "x" * MAX_HEADER_BYTES
    too_long = ("a line of the request is too long", f"{MAX_TARGET_BYTES:,} bytes", f"{MAX_HEADER_BYTES:,}")
    not_http = ("not well-formed HTTP/1.1",)
    for answer, words in [
        (service.get(f"/healthz?pad={'a' * MAX_TARGET_BYTES}"), too_long),
        (service.get("/healthz", f"Authorization: Bearer {token}"), too_long),
        (
            service.get("/healthz", *(f"X-Padding-{index}: {SECRET}" for index in range(MAX_HEADERS + 72))),
            (f"more than {MAX_HEADERS} headers",),
        ),
        (service.exchange(b"NOT-HTTP\r\n\r\n"), not_http),
        (
            service.exchange(
                b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBearer " + SECRET.encode() + b"\r\n\r\n"
            ),
            not_http,
        ),
    ]:
        assert "pad=aaaa" not in service.refused(answer, 400, "Malformed", *words)
    assert service.get(f"/healthz?pad={'a' * 9000}").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{service.port}/healthz", timeout=10).status_code == 200
    assert SECRET not in service.log.read_text(encoding="utf-8", errors="replace"), "the token was logged"


REPEATED = [
    ("agent", "/jobs", "status=RUNNING"),  # an array parameter (maxItems 16)
    ("agent", "/healthz", "probe=1"),  # a parameter nobody reads
    ("sidecar", "/jobs", "status=RUNNING"),  # a parameter taken once
    ("sidecar", "/healthz", "probe=1"),
]


@pytest.mark.parametrize(("name", "path", "pair"), REPEATED)
def test_a_query_parameter_given_500_times_is_a_json_400(
    services: dict[str, Served], name: str, path: str, pair: str
) -> None:
    service = services[name]
    answer = service.get(f"{path}?{'&'.join([pair] * 500)}", f"Authorization: Bearer {service.token}")
    parameter = pair.partition("=")[0]
    words = (f"{parameter} is given 500 times", f"more than {MAX_QUERY_VALUES} values")
    service.refused(answer, 400, "Malformed", *words)


def test_the_agents_status_filter_takes_at_most_max_items_values(services: dict[str, Served]) -> None:
    agent = services["agent"]
    auth = f"Authorization: Bearer {agent.token}"
    statuses = ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED"] * 4
    assert agent.get("/jobs?" + "&".join(f"status={s}" for s in statuses), auth).status_code == 200
    past = agent.get("/jobs?" + "&".join(f"status={s}" for s in [*statuses, "RUNNING"]), auth)
    agent.refused(past, 400, "Malformed", "status is given 17 times")


@pytest.mark.fast
def test_the_documents_state_the_limits_the_services_hold() -> None:
    for name in ("openapi-agent.yaml", "openapi-sidecar.yaml"):
        doc = yaml.safe_load((DOCS / name).read_text(encoding="utf-8"))
        said = " ".join(doc["info"]["description"].split())
        for limit in (
            f"longer than {MAX_TARGET_BYTES:,} bytes",
            f"a header longer than {MAX_HEADER_BYTES:,} bytes",
            f"more than {MAX_HEADERS} headers",
            f"more than {MAX_QUERY_VALUES} times is 400",
        ):
            assert limit in said, f"{name} does not say {limit!r}"
    agent = yaml.safe_load((DOCS / "openapi-agent.yaml").read_text(encoding="utf-8"))
    (status,) = [p for p in agent["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "status"]
    assert status["schema"]["maxItems"] == MAX_QUERY_VALUES
