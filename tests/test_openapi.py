"""The API reference, docs/openapi-agent.yaml and docs/openapi-sidecar.yaml, against real answers.

A real agent and a real sidecar (processes, as in production) answer every documented call, success
and error; each answer must be documented for its route, method and status, with the documented
content type, headers and body schema, and every documented answer must have been seen. Airflow is a
small stand-in for the part of its REST API v2 the reconciler reads (JWT login, task-instance reads),
so the test can choose what Airflow says without starting one.
"""

from __future__ import annotations

import ast
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess
from router_db import NewJob, RouterDB, TaskInstanceKey

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
INTERVAL = 0.3
# Documented answers no test can provoke without a bug in the server.
# 500s are bugs.
UNPROVOKABLE = {("post", "/run", "500"), ("post", "/jobs", "500")}


def pointer(*parts: str) -> str:
    """A JSON pointer (without the leading slash) to ``parts``, each escaped."""
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


# Keywords a schema object may use here (JSON Schema 2020-12 plus OpenAPI's annotations); anything
# else is most likely YAML gone wrong (an unquoted comma in a flow mapping makes a key of it).
SCHEMA_KEYWORDS = {
    "$ref", "type", "enum", "const", "properties", "required", "additionalProperties", "propertyNames",
    "items", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength",
    "pattern", "format", "oneOf", "anyOf", "not", "default", "description",
}  # fmt: skip


def schemas_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every schema object in an OpenAPI document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" or (
                key in ("items", "not", "additionalProperties", "propertyNames") and isinstance(value, dict)
            ):
                yield value
            elif key in ("properties",) or (key == "schemas" and isinstance(value, dict)):
                yield from (v for v in value.values() if isinstance(v, dict))
            elif key in ("oneOf", "anyOf"):
                yield from value
            yield from schemas_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from schemas_in(item)


@dataclass
class Spec:
    """An OpenAPI 3.1 document, checking answers against it and recording which answers were seen."""

    path: Path
    doc: dict[str, Any] = field(init=False)
    seen: set[tuple[str, str, str]] = field(default_factory=set)
    seen_responses: set[str] = field(default_factory=set)  # components/responses checked

    def __post_init__(self) -> None:
        self.doc = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        self.registry: Registry[Any] = Registry().with_resource(
            "urn:spec", Resource.from_contents(self.doc, default_specification=DRAFT202012)
        )

    def documented(self) -> set[tuple[str, str, str]]:
        return {
            (method, route, status)
            for route, item in self.doc["paths"].items()
            for method, operation in item.items()
            for status in operation["responses"]
        }

    def matching(self, path: str) -> list[str]:
        """The documented routes ``path`` matches, literal ones first (/jobs/update_status is not
        /jobs/{job_id}, though it matches both)."""
        routes = sorted(self.doc["paths"], key=lambda r: "{" in r)
        return [r for r in routes if re.match("^" + re.sub(r"\{[^}]+\}", "[^/]+", r) + "$", path)]

    def route(self, method: str, path: str) -> str:
        for route in self.matching(path):
            if method in self.doc["paths"][route]:
                return route
        raise AssertionError(f"{method.upper()} {path} is not documented in {self.path.name}")

    def validate(self, schema_pointer: str, value: Any, what: str) -> None:
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"urn:spec#/{schema_pointer}"},
            registry=self.registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
        errors = sorted(validator.iter_errors(value), key=str)
        assert not errors, f"{what} does not match {self.path.name}: {errors[0].message}\n{value!r}"

    def check(self, response: httpx.Response, expected_status: int) -> httpx.Response:
        """Assert ``response`` has ``expected_status`` and is documented as it is; record it."""
        request = response.request
        method, path = request.method.lower(), request.url.path
        what = f"{method.upper()} {path} -> {response.status_code}"
        assert response.status_code == expected_status, f"{what}, expected {expected_status}: {response.text}"
        route = self.route(method, path)
        status = str(response.status_code)
        answer_at = ["paths", route, method, "responses", status]
        answer = self.doc["paths"][route][method]["responses"].get(status)
        assert answer is not None, f"{what}: status {status} not documented for {method.upper()} {route}"
        self.check_answer(response, answer_at, answer, what)
        if 200 <= response.status_code < 300 and request.content:
            body = self.doc["paths"][route][method].get("requestBody")
            assert body is not None, f"{what}: a body was sent but none is documented"
            schema = pointer("paths", route, method, "requestBody", "content", "application/json", "schema")
            self.validate(schema, json.loads(request.content), f"{what} request")
        self.seen.add((method, route, status))
        return response

    def check_answer(
        self, response: httpx.Response, answer_at: list[str], answer: dict[str, Any], what: str
    ) -> None:
        """``response`` has a documented content type, body and headers of ``answer``."""
        if "$ref" in answer:
            name = answer["$ref"].removeprefix("#/components/responses/")
            answer_at, answer = ["components", "responses", name], self.doc["components"]["responses"][name]
        if answer_at[:2] == ["components", "responses"]:
            self.seen_responses.add(answer_at[2])
        content_type = response.headers.get("content-type", "").split(";")[0].strip()
        assert content_type in answer["content"], f"{what}: content type {content_type!r} not documented"
        if content_type == "application/json":
            schema = pointer(*answer_at, "content", "application/json", "schema")
            self.validate(schema, response.json(), what)
        for name, header in answer.get("headers", {}).items():
            if name not in response.headers and self.header(header).get("required") is False:
                continue  # documented as sent only sometimes (Retry-After of a full agent)
            assert name in response.headers, f"{what}: documented header {name} missing"
            self.validate_header(header, response.headers[name], f"{what} header {name}")

    def check_not_allowed(self, response: httpx.Response) -> httpx.Response:
        """Assert ``response`` is the documented 405 to a method the path does not have: its
        ``Allow`` lists exactly the documented methods of the routes the path matches (and HEAD
        wherever GET is: aiohttp answers it)."""
        method, path = response.request.method, response.request.url.path
        what = f"{method} {path} -> {response.status_code}"
        assert response.status_code == 405, f"{what}, expected 405: {response.text}"
        routes = self.matching(path)
        assert routes, f"{what}: no documented route matches {path}"
        documented = {m.upper() for r in routes for m in self.doc["paths"][r] if m in HTTP_METHODS}
        assert method not in documented, f"{what}: {method} is documented for {path}"
        allowed = documented | ({"HEAD"} if "GET" in documented else set())
        assert set(response.headers.get("Allow", "").split(",")) == allowed, f"{what}: Allow vs {allowed}"
        self.check_answer(response, [], {"$ref": "#/components/responses/MethodNotAllowed"}, what)
        return response

    def header(self, header: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in header:
            resolved: dict[str, Any] = self.doc["components"]["headers"][header["$ref"].rsplit("/", 1)[1]]
            return resolved
        return header

    def validate_header(self, header: dict[str, Any], value: str, what: str) -> None:
        header = self.header(header)
        if header["schema"]["type"] == "integer":
            assert value.isdigit(), f"{what}: {value!r} is not a non-negative integer"
            jsonschema.validate(int(value), header["schema"])
        else:
            assert header["schema"]["type"] == "string"
            jsonschema.validate(value, header["schema"])


@pytest.mark.fast
def test_the_documents_are_valid_openapi_3_1() -> None:
    for name in ("openapi-agent.yaml", "openapi-sidecar.yaml"):
        doc = yaml.safe_load((DOCS / name).read_text(encoding="utf-8"))
        validate_openapi(doc)
        assert doc["openapi"].startswith("3.1")
        for schema in schemas_in(doc):
            assert set(schema) <= SCHEMA_KEYWORDS, f"{name}: unexpected keys {set(schema) - SCHEMA_KEYWORDS}"


def registered_routes(package: str) -> set[tuple[str, str]]:
    """(method, path) of every route ``package``'s source registers with aiohttp, as
    ``<app>.router.add_<method>("<path>", ...)`` or ``<app>.router.add_route("<METHOD>", "<path>", ...)``."""
    routes: set[tuple[str, str]] = set()
    for source in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr == "router"
            ):
                continue
            literals = [arg.value for arg in node.args if isinstance(arg, ast.Constant)]
            if node.func.attr == "add_route" and len(literals) >= 2:
                routes.add((str(literals[0]).lower(), str(literals[1])))
            elif node.func.attr.removeprefix("add_") in HTTP_METHODS and literals:
                routes.add((node.func.attr.removeprefix("add_"), str(literals[0])))
    return routes


@pytest.mark.fast
@pytest.mark.parametrize(
    ("document", "package"), [("openapi-agent.yaml", "agent"), ("openapi-sidecar.yaml", "reconciler")]
)
def test_every_route_a_service_registers_is_documented_and_every_documented_one_is_served(
    document: str, package: str
) -> None:
    doc = yaml.safe_load((DOCS / document).read_text(encoding="utf-8"))
    documented = {(m, route) for route, item in doc["paths"].items() for m in item if m in HTTP_METHODS}
    registered = registered_routes(package)
    assert registered, f"no route found in {package}/: registered differently than this test reads?"
    assert registered <= documented, f"{document} lacks {sorted(registered - documented)}"

    def served(method: str, route: str) -> bool:
        """A literal path is also served by a template it matches (GET /jobs/update_status is the job
        lookup of GET /jobs/{job_id})."""
        return any(
            m == method and (r == route or re.fullmatch(re.sub(r"\{[^}]+\}", "[^/{}]+", r), route))
            for m, r in registered
        )

    unserved = sorted(op for op in documented if not served(*op))
    assert not unserved, f"{document} documents what {package}/ does not serve: {unserved}"


@pytest.mark.fast
@pytest.mark.parametrize("name", ["openapi-agent.yaml", "openapi-sidecar.yaml"])
def test_every_request_example_matches_its_schema(name: str) -> None:
    """Examples are what a reader copies, and what Schemathesis sends first (tests/test_api_contract.py)."""
    spec = Spec(DOCS / name)
    examples = 0
    for route, item in spec.doc["paths"].items():
        for method, operation in item.items():
            for media, body in operation.get("requestBody", {}).get("content", {}).items():
                schema = pointer("paths", route, method, "requestBody", "content", media, "schema")
                for example_name, example in body.get("examples", {}).items():
                    spec.validate(
                        schema, example["value"], f"{method.upper()} {route} example {example_name}"
                    )
                    examples += 1
    assert examples, f"{name} has no request example"


@pytest.mark.fast
def test_date_times_are_really_checked() -> None:
    """Without rfc3339-validator installed, format: date-time would silently accept anything."""
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    assert not checker.conforms("yesterday", "date-time")


# ------------------------------------------------------------------------------------------ agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(home=tmp_path_factory.mktemp("agent"), agent_id="agent-1", grace_seconds=2.0) as proc:
        yield proc


def test_agent_answers_match_the_documented_api(agent: AgentProcess, tmp_path: Path) -> None:
    spec = Spec(DOCS / "openapi-agent.yaml")
    auth = {"Authorization": f"Bearer {agent.token}"}
    with (
        httpx.Client(base_url=agent.url, headers=auth, timeout=30) as api,
        httpx.Client(base_url=agent.url, timeout=30) as anonymous,
    ):
        for path in ("/healthz", "/health", "/readyz"):
            spec.check(anonymous.get(path), 200)
        moved = agent.home.with_name(agent.home.name + "-moved")
        agent.home.rename(moved)  # no job yet: nothing else looks at the home meanwhile
        try:
            assert spec.check(anonymous.get("/readyz"), 503).json()["problems"]
            unsaved = spec.check(api.post("/drain"), 503).json()["error"]  # draining, but not kept
            assert "cannot save" in unsaved and "agent-1 is draining" in unsaved
        finally:
            moved.rename(agent.home)
        assert spec.check(anonymous.get("/readyz"), 503).json()["status"] == "draining"
        spec.check(api.post("/run", json={"job_id": "doc-drained", "payload": {"command": "true"}}), 503)
        assert spec.check(api.post("/undrain", json={}), 200).json()["draining"] is False
        assert spec.check(api.post("/drain", json={"ignored": 1}), 200).json()["draining"] is True
        flag = agent.home / "draining.json"
        flag.unlink()
        flag.mkdir()  # a flag that cannot be removed: the agent stays draining
        try:
            assert "stays draining" in spec.check(api.post("/undrain"), 503).json()["error"]
            assert spec.check(anonymous.get("/healthz"), 200).json()["draining"] is True
        finally:
            flag.rmdir()
        for path in ("/drain", "/undrain"):
            spec.check(api.post(path, content=b"[]"), 400)
            spec.check(api.post(path, json={"a": "x" * (1024 * 1024 + 1)}), 413)
            spec.check(anonymous.post(path), 401)
        assert spec.check(api.post("/undrain"), 200).json() == {
            "agent_id": "agent-1",
            "draining": False,
            "jobs_running": 0,
            "maintenance": None,
        }
        assert spec.check(anonymous.get("/readyz"), 200).json()["status"] == "ready"
        run = {"job_id": "doc-long", "payload": {"command": "sleep 30", "env": {"A": "1"}, "cwd": "/"}}
        spec.check(api.post("/run", json=run), 201)
        spec.check(api.post("/run", json=run), 409)
        spec.check(api.post("/run", json={**run, "job_id": "doc-x", "extra": 1}), 400)
        for payload in ({"cwd": "/no/such/dir"}, {"run_as": "no-such-user"}, {"env": {"A=B": "1"}}):
            refused = {"job_id": "doc-refused", "payload": {"command": "true", **payload}}
            spec.check(api.post("/run", json=refused), 400)
        spec.check(api.get("/jobs/doc-refused"), 404)  # a refused job is not recorded
        if os.geteuid() == 0:  # run_as needs an agent running as root; root itself only by name
            root = {"job_id": "doc-root", "payload": {"command": "true", "run_as": "root"}}
            assert "run_as_users" in spec.check(api.post("/run", json=root), 403).json()["error"]
        spec.check(anonymous.post("/run", json=run), 401)
        huge = {"job_id": "doc-huge", "payload": {"command": "x" * (1024 * 1024 + 1)}}
        spec.check(api.post("/run", json=huge), 413)
        spec.check(api.post("/run", json={"job_id": "doc-echo", "payload": {"command": "echo hi"}}), 201)

        with httpx.Client(base_url=agent.url, headers={"X-Agent-Token": agent.token}) as other_scheme:
            spec.check(other_scheme.get("/jobs/doc-long"), 200)
        with httpx.Client(base_url=agent.url, headers={"Authorization": f"bEaReR {agent.token}"}) as cased:
            spec.check(cased.get("/jobs/doc-long"), 200)
        spec.check(api.get("/jobs/.hidden"), 400)
        spec.check(api.get("/jobs/doc-nope"), 404)
        spec.check(anonymous.get("/jobs/doc-long"), 401)

        listed = spec.check(api.get("/jobs", params=[("status", "RUNNING"), ("status", "QUEUED")]), 200)
        assert "doc-long" in [job["job_id"] for job in listed.json()["jobs"]]
        assert {job["status"] for job in listed.json()["jobs"]} <= {"RUNNING", "QUEUED"}
        spec.check(api.get("/jobs"), 200)
        spec.check(api.get("/jobs", params={"status": "BOGUS"}), 400)
        spec.check(anonymous.get("/jobs"), 401)

        log = spec.check(api.get("/jobs/doc-echo/log", params={"offset": 0, "limit": 100}), 200)
        assert int(log.headers["X-Next-Offset"]) == len(log.content)
        for offset in (len(log.content), 17_592_186_040_321, 10**18 - 1):  # the end, past ext4's largest file
            past = spec.check(api.get("/jobs/doc-echo/log", params={"offset": offset}), 200)
            assert (past.content, int(past.headers["X-Next-Offset"])) == (b"", offset)
        spec.check(api.get("/jobs/doc-echo/log", params={"offset": "abc"}), 400)
        spec.check(api.get("/jobs/doc-echo/log", params={"offset": 10**18}), 400)
        spec.check(api.get("/jobs/doc-nope/log"), 404)
        spec.check(anonymous.get("/jobs/doc-echo/log"), 401)

        spec.check(api.post("/stop/doc-long", json={"reason": "a\u0000b"}), 400)
        spec.check(api.post("/stop/doc-long", json={"reason": "x" * (1024 * 1024 + 1)}), 413)
        stopped = spec.check(api.post("/stop/doc-long", json={"force": False, "reason": "docs"}), 200)
        assert stopped.json()["action"] == "terminated"
        again = spec.check(api.post("/stop/doc-long"), 200)
        assert again.json()["action"] == "already_finished"
        spec.check(api.post("/stop/doc-long", json={"force": "yes"}), 400)
        never_run = spec.check(api.post("/stop/doc-never-run"), 200).json()
        assert (never_run["action"], never_run["status"]) == ("already_finished", "FAILED")
        spec.check(api.post("/run", json={**run, "job_id": "doc-never-run"}), 409)  # the tombstone
        spec.check(anonymous.post("/stop/doc-long"), 401)

        for method, path in (
            ("PUT", "/run"), ("DELETE", "/jobs"), ("DELETE", "/jobs/doc-long"),
            ("PATCH", "/jobs/doc-echo/log"), ("GET", "/stop/doc-long"), ("POST", "/health"),
            ("POST", "/healthz"), ("DELETE", "/readyz"), ("GET", "/drain"), ("DELETE", "/undrain"),
        ):  # fmt: skip
            spec.check_not_allowed(api.request(method, path))
    with (
        AgentProcess(home=tmp_path / "full", agent_id="agent-full", max_jobs=1) as small,
        httpx.Client(base_url=small.url, headers={"Authorization": f"Bearer {small.token}"}) as full,
    ):
        spec.check(full.post("/run", json={"job_id": "doc-slot", "payload": {"command": "sleep 30"}}), 201)
        refused = spec.check(
            full.post("/run", json={"job_id": "doc-more", "payload": {"command": "true"}}), 503
        )
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["error"] == "agent agent-full is full: 1 of max_jobs 1 running"
        spec.check(full.post("/stop/doc-slot", json={"force": True}), 200)
    assert spec.documented() - UNPROVOKABLE <= spec.seen, spec.documented() - UNPROVOKABLE - spec.seen
    assert "MethodNotAllowed" in spec.seen_responses


# ---------------------------------------------------------------------------------------- sidecar


class FakeAirflow:
    """Airflow 3's REST API v2 as the reconciler reads it, answering from what the test set.

    ``listed`` is what the list endpoints (incremental and batch reads) say of a task instance;
    ``direct`` overrides what a direct read says ("absent" -> 404, "error" -> HTTP 500). A poll cycle
    stops a job only when both say so, so a test can make one path diverge and keep the loop still.
    """

    def __init__(self) -> None:
        self.listed: dict[tuple[str, str, str, int], str] = {}
        self.direct: dict[tuple[str, str, str, int], str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeAirflow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        if method == "POST" and path == "/auth/token":
            return 201, {"access_token": "fake-jwt"}
        if path == "/api/v2/dags":
            return 200, {"dags": [], "total_entries": 0}
        if path in ("/api/v2/dags/~/dagRuns/~/taskInstances", "/api/v2/dags/~/dagRuns/~/taskInstances/list"):
            items = [self._ti(key, state) for key, state in self.listed.items()]
            return 200, {"task_instances": items, "total_entries": len(items)}
        direct = re.match(r"^/api/v2/dags/([^/]+)/dagRuns/([^/]+)/taskInstances/([^/]+)(?:/(\d+))?$", path)
        if direct:
            dag, run, task, index = direct.groups()
            key = (unquote(dag), unquote(run), unquote(task), int(index) if index else -1)
            state = self.direct.get(key, self.listed.get(key, "absent"))
            if state == "absent":
                return 404, {"detail": "The Task Instance was not found"}
            if state == "error":
                return 500, {"detail": "Internal Server Error"}
            return 200, self._ti(key, state)
        return 404, {"detail": "Not Found"}

    @staticmethod
    def _ti(key: tuple[str, str, str, int], state: str) -> dict[str, Any]:
        dag_id, run_id, task_id, map_index = key
        return {
            "dag_id": dag_id,
            "dag_run_id": run_id,
            "task_id": task_id,
            "map_index": map_index,
            "state": state,
            "try_number": 1,
            "end_date": None,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, body = fake.answer(self.command, urlsplit(self.path).path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def submission(task_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command": "sleep 30",
        "labels": ["default"],
        "dag_id": "docs",
        "task_id": task_id,
        "run_id": "manual__1",
        "try_number": 1,
    }
    return {**body, **overrides}


def wait_until_status(client: httpx.Client, job_id: str, status: str) -> None:
    deadline = time.monotonic() + 15
    while client.get(f"/jobs/{job_id}").json()["status"] != status:
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        time.sleep(0.1)


FLEET_TOKEN = "docs-fleet-token"


def test_sidecar_answers_match_the_documented_api(agent: AgentProcess, tmp_path: Path) -> None:
    spec = Spec(DOCS / "openapi-sidecar.yaml")
    nowhere = f"http://127.0.0.1:{free_port()}"
    agents = [
        AgentRef("agent-1", agent.url, agent.token, labels=["default"]),
        AgentRef("agent-down", nowhere, "unused", labels=["down"]),
    ]
    with (
        FakeAirflow() as airflow,
        SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="fake",
            agents=agents,
            api_version="v2",
            interval_seconds=INTERVAL,
            fleet_token=FLEET_TOKEN,
            extra_config=(
                '[fleet]\nregistration_labels = ["default", "pool"]\nregistration_rate_per_second = 1.0\n'
            ),
        ) as sidecar,
        sidecar.client() as api,
        httpx.Client(base_url=sidecar.url, timeout=30) as anonymous,
    ):
        for task in ("long", "kept", "unreadable", "quick", "unreachable"):
            airflow.listed[("docs", "manual__1", task, -1)] = "running"

        spec.check(anonymous.get("/healthz"), 200)
        assert "reconciler_cycles_total" in spec.check(anonymous.get("/metrics"), 200).text
        deadline = time.monotonic() + 15
        while anonymous.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the sidecar never became ready against the fake Airflow"
            time.sleep(0.1)
        spec.check(anonymous.get("/readyz"), 200)

        long_job = spec.check(api.post("/jobs", json=submission("long")), 201).json()["job_id"]
        assert spec.check(api.post("/jobs", json=submission("long")), 200).json()["created"] is False
        spec.check(api.post("/jobs", content=b"{not json"), 400)
        nul = spec.check(api.post("/jobs", json=submission("nul", env={"A": "a\u0000b"})), 400)
        assert "env.A" in nul.json()["error"]
        spec.check(anonymous.post("/jobs", json=submission("long")), 401)
        spec.check(api.post("/jobs", json=submission("huge", command="x" * (2 * 1024 * 1024))), 413)
        spec.check(api.post("/jobs", json=submission("long-cmd", command="x" * (64 * 1024 + 1))), 400)
        spec.check(api.post("/jobs", json=submission("mapped", map_index=2**31)), 400)
        spec.check(api.post("/jobs", json=submission("nowhere", agent_id="agent-9")), 400)
        spec.check(api.post("/jobs", json=submission("nowhere", labels=["gpu"])), 400)
        refused = spec.check(api.post("/jobs", json=submission("refused", cwd="/no/such/dir")), 201).json()
        assert (refused["status"], refused["reason"].startswith("agent refused")) == ("FAILED", True)
        with httpx.Client(
            base_url=sidecar.url, headers={"Authorization": f"bEaReR {sidecar.token}"}
        ) as cased:
            spec.check(cased.get(f"/jobs/{long_job}"), 200)

        spec.check(api.get("/jobs", params={"dag_id": "docs", "status": "RUNNING"}), 200)
        spec.check(api.get("/jobs", params={"status": "BOGUS"}), 400)
        for bad in ({"status": ""}, {"dag_id": ""}, {"run_id": "a\u0000b"}, {"dag_id": "d" * 251}):
            spec.check(api.get("/jobs", params=bad), 400)
        spec.check(api.get("/jobs", params=[("status", "RUNNING"), ("status", "FAILED")]), 400)
        spec.check(anonymous.get("/jobs"), 401)
        spec.check(api.get(f"/jobs/{long_job}"), 200)
        spec.check(api.get("/jobs/bad!id"), 400)
        spec.check(api.get("/jobs/no-such-job"), 404)
        spec.check(anonymous.get(f"/jobs/{long_job}"), 401)
        spec.check(api.get(f"/jobs/{long_job}/events"), 200)
        spec.check(api.get("/jobs/bad!id/events"), 400)
        spec.check(api.get("/jobs/no-such-job/events"), 404)
        spec.check(anonymous.get(f"/jobs/{long_job}/events"), 401)
        log = spec.check(api.get(f"/jobs/{long_job}/log", params={"offset": 0}), 200)
        biggest = 10**18 - 1  # 18 digits, as the agent takes: logs may pass 2 GiB
        past_end = spec.check(api.get(f"/jobs/{long_job}/log", params={"offset": biggest}), 200)
        assert (past_end.content, past_end.headers["X-Log-Size"]) == (b"", log.headers["X-Log-Size"])
        assert past_end.headers["X-Next-Offset"] == str(biggest)
        spec.check(api.get(f"/jobs/{long_job}/log", params={"offset": -1}), 400)
        spec.check(api.get("/jobs/no-such-job/log"), 404)
        spec.check(anonymous.get(f"/jobs/{long_job}/log"), 401)

        update = "/jobs/update_status"
        spec.check(anonymous.post(update, json={"job_id": long_job, "status": "failed"}), 401)
        spec.check(api.post(update, json={"status": "failed"}), 400)
        spec.check(api.post(update, json={"job_id": long_job, "status": "x" * (1024 * 1024)}), 413)
        spec.check(api.get(update), 404)  # the job lookup, for the id "update_status"
        spec.check(anonymous.get(update), 401)
        spec.check(api.post(update, json={"job_id": "no-such-job", "status": "failed"}), 404)
        kept = spec.check(api.post("/jobs", json=submission("kept")), 201).json()["job_id"]
        spec.check(api.post(update, json={"job_id": kept, "status": "failed"}), 409)
        unreadable = spec.check(api.post("/jobs", json=submission("unreadable")), 201).json()["job_id"]
        airflow.direct[("docs", "manual__1", "unreadable", -1)] = "error"
        spec.check(api.post(update, json={"job_id": unreadable, "status": "failed"}), 503)

        airflow.direct[("docs", "manual__1", "long", -1)] = "failed"
        by_key = {"dag_id": "docs", "task_id": "long", "run_id": "manual__1", "status": "failed"}
        stopped = spec.check(api.post(update, json=by_key), 200).json()
        assert (stopped["action"], stopped["status"]) == ("stopped", "FAILED")

        quick = spec.check(api.post("/jobs", json=submission("quick", command="exit 0")), 201).json()
        wait_until_status(api, quick["job_id"], "SUCCEEDED")
        final = spec.check(api.post(update, json={"job_id": quick["job_id"], "status": "failed"}), 200)
        assert final.json()["action"] == "already_final"

        lost = submission("unreachable", labels=["down"])
        lost_job = spec.check(api.post("/jobs", json=lost), 201).json()
        assert lost_job["status"] == "QUEUED"  # the agent could not be reached
        spec.check(api.get(f"/jobs/{lost_job['job_id']}/log"), 502)
        # A job of an agent neither configured nor registered (its [[agents]] entry since removed).
        db = RouterDB(f"sqlite:///{sidecar.workdir / 'router.db'}")
        key = TaskInstanceKey(dag_id="docs", task_id="gone", run_id="manual__1")
        (gone,) = db.import_running([NewJob(key, "agent-gone", "true")], source="test")
        db.dispose()
        refusal = spec.check(api.get(f"/jobs/{gone}/log"), 410).json()["error"]
        assert refusal.startswith("agent agent-gone is no longer configured")
        airflow.direct[("docs", "manual__1", "unreachable", -1)] = "failed"
        requested = spec.check(api.post(update, json={"job_id": lost_job["job_id"], "status": "failed"}), 202)
        assert "Agent communication failed" in requested.json()["message"]
        pending = spec.check(api.post(update, json={"job_id": lost_job["job_id"], "status": "failed"}), 200)
        assert pending.json()["action"] == "stop_pending"

        # The agents: listed, drained and undrained; one unknown, one unreachable, one that answers.
        listed = spec.check(api.get("/agents"), 200).json()["agents"]
        assert [(a["agent_id"], a["draining"]) for a in listed] == [("agent-1", False), ("agent-down", False)]
        spec.check(anonymous.get("/agents"), 401)
        for verb in ("drain", "undrain"):
            spec.check(api.post(f"/agents/agent-9/{verb}"), 404)
            spec.check(anonymous.post(f"/agents/agent-1/{verb}"), 401)
            spec.check(api.post(f"/agents/agent-1/{verb}", content=b"[]"), 400)
            spec.check(api.post(f"/agents/agent-1/{verb}", json={"a": "x" * (1024 * 1024 + 1)}), 413)
        unheard = spec.check(api.post("/agents/agent-down/drain"), 502).json()["error"]
        assert unheard.startswith("agent agent-down could not be told to drain: ")
        full = spec.check(api.post("/jobs", json=submission("no-room", labels=["down"])), 503)
        assert full.json()["error"] == "no capacity: 1 agent(s) carry labels ['down']: agent-down draining"
        spec.check(api.post("/agents/agent-down/undrain"), 502)
        assert spec.check(api.post("/agents/agent-1/drain", json={}), 200).json()["state"] == "draining"
        assert spec.check(api.post("/agents/agent-1/undrain"), 200).json()["draining"] is False

        # An agent registers itself (PUT /agents/{id}, the fleet token): one that takes the fleet token
        # at its URL, and the refusals.
        with AgentProcess(tmp_path / "registers", agent_id="reg-1", token=FLEET_TOKEN) as joining:
            beat = {"url": joining.url, "instance": "docs-1", "labels": ["default"], "max_jobs": 2}
            with sidecar.client(FLEET_TOKEN) as fleet:
                spec.check(anonymous.put("/agents/reg-1", json=beat), 401)
                spec.check(api.put("/agents/reg-1", json=beat), 401)  # an operator's token registers nothing
                spec.check(fleet.put("/agents/reg-1", json={**beat, "url": "ftp://x"}), 400)
                spec.check(fleet.put("/agents/reg-1", json={**beat, "version": "v" * (1024 * 1024)}), 413)
                spec.check(fleet.put("/agents/agent-1", json={**beat, "url": agent.url}), 409)
                wrong = spec.check(fleet.put("/agents/reg-2", json=beat), 422).json()["error"]
                assert "could not verify agent reg-2" in wrong and "reg-1" not in wrong
                assert "answers as 'reg-1'" in sidecar.log_path.read_text()  # the reason, for the operator
                joined = spec.check(fleet.put("/agents/reg-1", json=beat), 200).json()
                assert joined["agent_id"] == "reg-1"
                stolen = spec.check(fleet.put("/agents/reg-1", json={**beat, "labels": ["gpu"]}), 403)
                assert "registration_labels" in stolen.json()["error"]
                # New processes are called back at most registration_rate_per_second (a burst of 5).
                rushed = [
                    fleet.put("/agents/reg-1", json={**beat, "instance": f"rush-{i}"}) for i in range(8)
                ]
                spec.check(next(r for r in rushed if r.status_code == 429), 429)
                spec.check(fleet.get("/agents"), 401)  # a fleet token opens registration only
            listed = spec.check(api.get("/agents"), 200).json()["agents"]
            assert [(a["agent_id"], a["registered"]) for a in listed][-1] == ("reg-1", True)

            # Revoked, then forgotten (agentic agents revoke / forget); and the refusals.
            spec.check(api.delete("/agents/reg-1"), 409)  # live, not revoked
            for method, path in (("POST", "/agents/{}/revoke"), ("DELETE", "/agents/{}")):
                spec.check(anonymous.request(method, path.format("reg-1")), 401)
                spec.check(api.request(method, path.format("-bad")), 404)  # no agent can be named so
                spec.check(api.request(method, path.format("reg-9")), 404)
            spec.check(api.post("/agents/agent-1/revoke"), 409)  # configured in [[agents]]
            revoked = spec.check(api.post("/agents/reg-1/revoke"), 200).json()
            assert revoked["agent_id"] == "reg-1" and revoked["revoked_at"]
            with sidecar.client(FLEET_TOKEN) as fleet:
                spec.check(fleet.put("/agents/reg-1", json=beat), 403)  # no registration of its id
            assert [a["state"] for a in spec.check(api.get("/agents"), 200).json()["agents"]][-1] == "revoked"
            assert spec.check(api.delete("/agents/reg-1"), 200).json() == {
                "agent_id": "reg-1",
                "forgotten": True,
            }

        # An agent that registers itself shows how that goes in its /healthz, as documented.
        port = free_port()
        with (
            AgentProcess(
                tmp_path / "self-registered",
                agent_id="reg-3",
                port=port,
                token=FLEET_TOKEN,
                accepted_tokens=[],
                extra_config="heartbeat_seconds = 0.5\n",
                extra_env={
                    "ROUTER_URL": sidecar.url,
                    "SELF_URL": f"http://127.0.0.1:{port}",
                    "AGENTIC_FLEET_TOKEN": FLEET_TOKEN,
                    "AGENTIC_AGENT_TOKEN": "",
                },
            ) as registered,
            httpx.Client(base_url=registered.url, timeout=10) as probe,
        ):
            agent_spec = Spec(DOCS / "openapi-agent.yaml")
            deadline = time.monotonic() + 15
            while not (shown := agent_spec.check(probe.get("/healthz"), 200).json()["registration"])[
                "registered"
            ]:
                assert time.monotonic() < deadline, shown
                time.sleep(0.1)
            assert shown["identity_fingerprint"] and FLEET_TOKEN not in probe.get("/healthz").text

        # The read-only pages (HTML), with a browser's cookie; scripts' bearer tokens work there too.
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        with httpx.Client(base_url=sidecar.url, timeout=30) as browser:
            for path in ("/ui/", "/ui/jobs", f"/ui/jobs/{long_job}", "/ui/agents"):
                assert spec.check(browser.get(path), 303).headers["Location"].startswith("/ui/login")
                spec.check(browser.get(path, headers={"Authorization": "Bearer wrong"}), 401)
            spec.check(browser.get("/ui/login", params={"next": f"/ui/jobs/{long_job}"}), 200)
            spec.check(browser.post("/ui/login", data={"token": "wrong"}), 401)
            spec.check(browser.post("/ui/login", content=b"token=%ff", headers=form), 400)
            spec.check(browser.post("/ui/login", content=b"token=" + b"x" * 20_000, headers=form), 413)
            back = {"token": sidecar.token, "next": f"/ui/jobs/{long_job}"}
            assert spec.check(browser.post("/ui/login", data=back), 303).headers["Location"] == back["next"]
            spec.check(browser.get(f"/ui/jobs/{long_job}"), 200)
            spec.check(browser.get("/ui/jobs", params={"dag_id": "docs", "run_id": "", "status": ""}), 200)
            spec.check(browser.get("/ui/jobs", params={"status": "BOGUS"}), 400)
            spec.check(browser.get("/ui/jobs/bad!id"), 400)
            spec.check(browser.get("/ui/jobs/no-such-job"), 404)
            spec.check(browser.get("/ui/agents"), 200)
            spec.check(browser.post("/ui/logout"), 303)
            spec.check(browser.get("/ui/agents"), 303)
        spec.check(api.get("/ui/jobs"), 200)
        for method, path in (("PUT", "/ui/jobs"), ("DELETE", "/ui/login"), ("GET", "/ui/logout")):
            spec.check_not_allowed(anonymous.request(method, path))

        for method, path in (
            ("PUT", "/jobs"), ("DELETE", f"/jobs/{long_job}"), ("PUT", "/jobs/update_status"),
            ("POST", f"/jobs/{long_job}/log"), ("PUT", f"/jobs/{long_job}/events"),
        ):  # fmt: skip
            spec.check_not_allowed(api.request(method, path))
        for method, path in (("POST", "/metrics"), ("POST", "/healthz"), ("DELETE", "/readyz")):
            spec.check_not_allowed(anonymous.request(method, path))

    with (
        SidecarProcess(
            workdir=tmp_path / "unready",
            airflow_url=nowhere,
            airflow_password="x",
            agents=[AgentRef("agent-far", nowhere, "unused", labels=["far"])],
            api_version="v2",
            rate_limit_per_second=0.01,  # three requests, then 429 for the rest of the test
            rate_limit_burst=3,
            extra_config='[fleet]\nwhen_full = "refuse"\n',
        ) as unready,
        unready.client() as api,
        httpx.Client(base_url=unready.url, timeout=30) as anonymous,
    ):
        spec.check(anonymous.get("/readyz"), 503)
        off = {"url": "http://127.0.0.1:1", "instance": "x"}
        assert "registration is off" in spec.check(api.put("/agents/any", json=off), 404).json()["error"]
        spec.check(api.post("/agents/agent-far/drain"), 502)  # the flag stays: no room left
        refused = spec.check(api.post("/jobs", json=submission("no-room", labels=["far"])), 409)
        assert refused.json()["error"] == "no capacity: 1 agent(s) carry labels ['far']: agent-far draining"
        spec.check(api.get("/jobs"), 200)
        spec.check(api.get("/jobs"), 429)
        spec.check(api.post("/jobs", json=submission("limited")), 429)
        spec.check(api.post("/jobs/update_status", json={"job_id": "x", "status": "failed"}), 429)
        for path in ("/jobs/x", "/jobs/x/log", "/jobs/x/events", "/jobs/update_status", "/agents"):
            spec.check(api.get(path), 429)
        for verb in ("drain", "undrain", "revoke"):
            spec.check(api.post(f"/agents/agent-far/{verb}"), 429)
        spec.check(api.delete("/agents/agent-far"), 429)
        for path in ("/ui/", "/ui/jobs", "/ui/jobs/x", "/ui/agents"):
            spec.check(api.get(path), 429)
        for guess in ("guess", "again", "once more"):  # the address's own bucket: three, then 429
            spec.check(anonymous.post("/ui/login", data={"token": guess}), 401)
        spec.check(anonymous.post("/ui/login", data={"token": "too many"}), 429)
    assert spec.documented() - UNPROVOKABLE <= spec.seen, spec.documented() - UNPROVOKABLE - spec.seen
    assert "MethodNotAllowed" in spec.seen_responses
