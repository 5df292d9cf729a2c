"""Airflow's API misbehaving under a running sidecar: no stop on uncertainty, visible, and recovered.

A fault-injecting layer (an aiohttp middleware) sits in front of the Airflow stand-in of
``bench.standins`` (REST API v2, recorded answers, real paging rules), served on loopback from a
thread. The sidecar and the agent are real processes; one job runs ``sleep 60``. Its task instance is
``running`` in the stand-in; the faulty answers say ``failed`` wherever they carry a state at all, so
a stop would be wrong unless a good read confirmed it. Each test ends with the positive control: the
task instance truly becomes ``failed`` and the job IS stopped (the guard, not a dead loop). Every wait
is bounded.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from aiohttp import web

from bench.standins import AirflowStandIn, recorded_task_instance
from harness.agent import AgentProcess
from harness.served import ServedApp
from harness.sidecar import AgentRef, SidecarProcess
from router_db import JobStatus, RouterDB

KEY = ("d", "r", "t", -1)  # (dag_id, run_id, task_id, map_index) of the one task instance
CLIENT_TIMEOUT = 1.0  # [airflow] timeout_seconds of the sidecar under test
INTERVAL = 0.2  # [poll] interval_seconds: ready_after is then max(10 s, 5 intervals) = 10 s
LIST_PATH = "/api/v2/dags/~/dagRuns/~/taskInstances"
BATCH_PATH = "/api/v2/dags/~/dagRuns/~/taskInstances/list"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FaultyAirflow(ServedApp):
    """The stand-in behind a switchable fault layer; ``mode`` is set from the test's thread.

    Modes: ``ok``; ``500``; ``hang`` (past the client's timeout); ``slow`` (within it); ``expired``
    (every token issued so far is refused with 401 until the client logs in again); ``auth_down``
    (401 everywhere, logins refused too); ``truncated``, ``missing_field``, ``wrong_type`` (garbage
    answers); ``vanish_404`` and ``vanish_empty`` (the second page of a listing is gone).
    """

    def __init__(self) -> None:
        self.standin = AirflowStandIn(recorded_task_instance())
        self.standin.add(*KEY, state="running", try_number=1)
        self.mode = "ok"
        self.logins = 0
        self.valid_token: str | None = None  # in "expired" mode: the only token accepted
        app = self.standin.app()
        app.middlewares.append(self._fault)
        super().__init__(app)

    def set_mode(self, mode: str) -> None:
        if mode == "expired":
            self.valid_token = None  # every token handed out so far has expired
        self.mode = mode

    def mark(self, state: str) -> None:
        """The truth changes (a person marks the task instance): new state, updated now."""
        self.call_soon(self.standin.flip, [KEY], state)

    def failed_ti(self, **changes: Any) -> dict[str, Any]:
        """The task instance as a faulty answer reports it: ``failed``, with ``changes`` applied."""
        raw = self.standin.render(self.standin.rows[KEY])
        raw["state"] = "failed"
        for name, value in changes.items():
            if value is _DROP:
                raw.pop(name, None)
            else:
                raw[name] = value
        return raw

    @web.middleware
    async def _fault(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        mode = self.mode
        if request.path == "/auth/token":
            if mode == "auth_down":
                return web.json_response({"detail": "Invalid credentials"}, status=401)
            self.logins += 1
            token = f"token-{self.logins}"
            if mode == "expired" and self.valid_token is None:
                self.valid_token = token
            return web.json_response({"access_token": token, "token_type": "bearer"}, status=201)
        if request.path.startswith("/api/v2/monitor/"):
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        if mode == "auth_down" or (mode == "expired" and auth != f"Bearer {self.valid_token}"):
            return web.json_response({"detail": "Token expired"}, status=401)
        if mode == "500":
            return web.json_response({"detail": "Internal Server Error"}, status=500)
        if mode == "hang":
            await asyncio.sleep(CLIENT_TIMEOUT * 4)  # past the client's timeout; then a bogus stop
            return web.json_response(self._listing([self.failed_ti()]) | {"total_entries": 1})
        if mode == "slow":
            await asyncio.sleep(CLIENT_TIMEOUT * 0.4)
            return await handler(request)
        if mode == "truncated":
            return web.Response(body=b'{"task_instances": [', content_type="application/json")
        if mode in ("missing_field", "wrong_type"):
            ti = self.failed_ti(try_number=_DROP if mode == "missing_field" else "1")
            if request.path in (LIST_PATH, BATCH_PATH):
                return web.json_response(self._listing([ti]) | {"total_entries": 1})
            if request.path.startswith("/api/v2/dags/d/"):
                return web.json_response(ti)
        if mode in ("vanish_404", "vanish_empty") and request.path in (LIST_PATH, BATCH_PATH):
            later = (
                bool(request.query.get("cursor"))
                if request.method == "GET"
                else int((await request.json()).get("page_offset", 0)) > 0
            )
            if not later:  # page one: the task instance "failed", and more pages to come
                return web.json_response(self._listing([self.failed_ti()]) | {"total_entries": 2})
            if mode == "vanish_404":
                return web.json_response({"detail": "Not Found"}, status=404)
            return web.json_response(self._listing([]) | {"total_entries": 2})
        return await handler(request)

    @staticmethod
    def _listing(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"task_instances": items, "next_cursor": "ff", "previous_cursor": None}


_DROP: Any = object()


class Sidecar(SidecarProcess):
    """The harness's sidecar with a short ``[airflow] timeout_seconds``."""

    def write_config(self) -> Path:
        path = super().write_config()
        text = path.read_text()
        path.write_text(text.replace("[airflow]\n", f"[airflow]\ntimeout_seconds = {CLIENT_TIMEOUT}\n", 1))
        return path


@pytest.fixture
def airflow() -> Iterator[FaultyAirflow]:
    served = FaultyAirflow()
    served.start()
    yield served
    served.stop()


class Rig:
    def __init__(self, tmp_path: Path, airflow: FaultyAirflow) -> None:
        self.airflow = airflow
        self.agent = AgentProcess(tmp_path / "agent", agent_id="agent-1", token="a-token")
        self.sidecar = Sidecar(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[AgentRef("agent-1", self.agent.url, self.agent.token, labels=["default"])],
            api_version="v2",
            interval_seconds=INTERVAL,
            full_resync_seconds=2.0,  # both the batch and the incremental listing meet every fault
        )
        self.db: RouterDB | None = None
        self.job_id = ""
        self.pid = 0

    def start(self) -> None:
        self.agent.start()
        self.sidecar.start()
        self.db = RouterDB(f"sqlite:///{self.sidecar.workdir / 'router.db'}")
        dag_id, run_id, task_id, map_index = KEY
        body = {
            "command": "sleep 60",
            "agent_id": "agent-1",
            "dag_id": dag_id,
            "task_id": task_id,
            "run_id": run_id,
            "map_index": map_index,
            "try_number": 1,
        }
        with self.sidecar.client() as client:
            answer = client.post("/jobs", json=body)
        assert answer.status_code == 201, answer.text
        self.job_id = str(answer.json()["job_id"])
        info = httpx.get(
            f"{self.agent.url}/jobs/{self.job_id}", headers={"Authorization": f"Bearer {self.agent.token}"}
        )
        self.pid = int(info.json()["pid"])
        wait_until("ready", lambda: self.readyz() == 200, timeout=15)

    def close(self) -> None:
        self.sidecar.stop()
        self.agent.stop()
        if self.db is not None:
            self.db.dispose()

    def metrics(self) -> str:
        return httpx.get(f"{self.sidecar.url}/metrics", timeout=5).text

    def counter(self, name: str, label: str, value: str) -> float:
        pattern = rf'^reconciler_{name}_total\{{{label}="{re.escape(value)}"\}} ([0-9.e+]+)$'
        found = re.search(pattern, self.metrics(), re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def cycles(self, result: str) -> float:
        return self.counter("cycles", "result", result)

    def readyz(self) -> int:
        return httpx.get(f"{self.sidecar.url}/readyz", timeout=5).status_code

    def status(self) -> JobStatus:
        assert self.db is not None
        job = self.db.get(self.job_id)
        assert job is not None
        return job.status

    def assert_untouched(self) -> None:
        assert self.status() is JobStatus.RUNNING, self.status()
        assert alive(self.pid)
        assert self.counter("stop_requests", "outcome", "stopped") == 0
        assert "reconciler_divergences_total{" not in self.metrics()

    def hold(self, seconds: float) -> None:
        """Let cycles run under the fault, checking all along that nothing is stopped."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.assert_untouched()
            time.sleep(0.25)

    def recover(self) -> None:
        """Fault lifted: ok cycles resume, /readyz answers 200, the job still runs."""
        self.airflow.set_mode("ok")
        ok = self.cycles("ok")
        wait_until("ok cycles again", lambda: self.cycles("ok") >= ok + 3, timeout=15)
        wait_until("ready again", lambda: self.readyz() == 200, timeout=15)
        self.assert_untouched()

    def positive_control(self) -> None:
        """A good read truly says failed: the job IS stopped."""
        self.airflow.mark("failed")
        wait_until("FAILED", lambda: self.status() is JobStatus.FAILED, timeout=15)
        wait_until("the job's process gone", lambda: not alive(self.pid), timeout=10)
        assert self.counter("stop_requests", "outcome", "stopped") == 1


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not {what} within {timeout} s")


@pytest.fixture
def rig(tmp_path: Path, airflow: FaultyAirflow) -> Iterator[Rig]:
    setup = Rig(tmp_path, airflow)
    try:
        setup.start()
        yield setup
    finally:
        setup.close()


def test_airflow_answering_500_stops_nothing_fails_readyz_and_the_loop_recovers(rig: Rig) -> None:
    errors, http500 = rig.cycles("airflow_error"), rig.counter("airflow_requests", "code", "500")
    rig.airflow.set_mode("500")
    started = time.monotonic()
    while rig.readyz() == 200:  # ready_after = max(10 s, 5 intervals): waited out once, here
        rig.assert_untouched()
        assert time.monotonic() - started < 20, "readyz still 200 after 20 s of failing cycles"
        time.sleep(0.25)
    assert time.monotonic() - started >= 9.0  # not before ready_after (less a cycle's slack)
    rig.assert_untouched()
    assert rig.cycles("airflow_error") >= errors + 10
    assert rig.counter("airflow_requests", "code", "500") >= http500 + 10
    rig.recover()
    rig.positive_control()


@pytest.mark.parametrize("mode", ["hang", "slow"])
def test_airflow_slow_or_hanging_past_the_timeout(rig: Rig, mode: str) -> None:
    errors, timeouts, ok = (
        rig.cycles("airflow_error"),
        rig.counter("airflow_requests", "code", "error"),
        rig.cycles("ok"),
    )
    rig.airflow.set_mode(mode)
    rig.hold(4 * CLIENT_TIMEOUT + 1)
    if mode == "hang":  # each cycle's read ends at the client's timeout: an error, never a stop
        assert rig.cycles("airflow_error") >= errors + 2
        assert rig.counter("airflow_requests", "code", "error") >= timeouts + 2
    else:  # slow but within the timeout: cycles succeed, readiness holds
        assert rig.cycles("airflow_error") == errors
        assert rig.cycles("ok") >= ok + 3
        assert rig.readyz() == 200
    rig.recover()
    rig.positive_control()


def test_expired_token_is_renewed_once_and_a_refused_login_is_an_error_not_a_stop(rig: Rig) -> None:
    logins, http401, errors = (
        rig.airflow.logins,
        rig.counter("airflow_requests", "code", "401"),
        rig.cycles("airflow_error"),
    )
    rig.airflow.set_mode("expired")
    wait_until("a fresh login", lambda: rig.airflow.logins == logins + 1, timeout=5)
    ok = rig.cycles("ok")
    rig.hold(1.5)
    assert rig.airflow.logins == logins + 1  # re-authenticated exactly once, then carried on
    # One 401 for each request in flight when the token expired: the targeted read sends two at once.
    assert http401 + 1 <= rig.counter("airflow_requests", "code", "401") <= http401 + 2
    assert rig.cycles("ok") >= ok + 3 and rig.cycles("airflow_error") == errors
    assert rig.readyz() == 200

    rig.airflow.set_mode("auth_down")  # the token expires and logging in fails as well
    rig.hold(2.0)
    assert rig.cycles("airflow_error") >= errors + 3
    assert rig.counter("airflow_requests", "code", "401") >= http401 + 4
    rig.recover()
    rig.positive_control()


@pytest.mark.parametrize("mode", ["truncated", "missing_field", "wrong_type"])
def test_garbage_answers_are_errors_not_stops(rig: Rig, mode: str) -> None:
    errors = rig.cycles("airflow_error")
    rig.airflow.set_mode(mode)
    rig.hold(2.5)  # spans a full resync (batch endpoint) and incremental reads (listing)
    assert rig.cycles("airflow_error") >= errors + 5
    rig.recover()
    rig.positive_control()


def test_a_listing_page_that_vanishes_mid_listing_is_an_error_not_a_stop(rig: Rig) -> None:
    errors, http404 = rig.cycles("airflow_error"), rig.counter("airflow_requests", "code", "404")
    rig.airflow.set_mode("vanish_404")
    rig.hold(2.5)
    assert rig.cycles("airflow_error") >= errors + 5
    assert rig.counter("airflow_requests", "code", "404") >= http404 + 5
    rig.recover()
    rig.positive_control()


def test_an_empty_page_with_a_dangling_cursor_is_the_end_and_the_direct_read_overrules_page_one(
    rig: Rig,
) -> None:
    # Keyset paging may legitimately end on an empty page that still carries a cursor, so the
    # listing is accepted; page one's "failed" is then re-read directly, says running: kept.
    rig.airflow.set_mode("vanish_empty")
    rig.hold(2.5)
    rig.recover()
    rig.positive_control()
