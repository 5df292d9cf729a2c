"""SIGTERM ends a task's wait to submit its job at once, and says why (agentic_airflow.stopping).

Airflow 3's handler of SIGTERM in a task only calls ``on_kill`` and returns; Airflow 2's raises its own
exception. Both are stood in for here by handlers installed in this process, which then gets a real
SIGTERM while ``submit_patiently`` sleeps, sends its request or waits on Airflow to read the connection.
Real Airflow: tests/test_airflow_submit_sigterm.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
from aiohttp import web

from agentic_airflow.polling import Backoff, submit_patiently
from agentic_airflow.sidecar_client import SidecarEndpoint, SidecarError
from agentic_airflow.stopping import StopOnSigterm, TaskStopped
from harness.processes import free_port
from harness.served import ServedApp

pytestmark = pytest.mark.fast

STOP_BUDGET = 2.0


class AirflowTerminated(BaseException):
    """What the stand-in of Airflow 2's handler raises."""


class AirflowHandler:
    """Airflow's SIGTERM handler in a task: ``on_kill``, then (Airflow 2) a raise, or (Airflow 3) nothing."""

    def __init__(self, *, raises: bool) -> None:
        self.raises = raises
        self.calls = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.calls += 1
        if self.raises:
            raise AirflowTerminated("Task received SIGTERM signal")


@contextmanager
def airflow_handler(*, raises: bool = False) -> Iterator[AirflowHandler]:
    assert threading.current_thread() is threading.main_thread()  # signals reach this thread only
    handler = AirflowHandler(raises=raises)
    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, before)


def installed() -> object:
    """This process's handler of SIGTERM now."""
    return signal.getsignal(signal.SIGTERM)


def sigterm_when(condition: Callable[[], bool], sent: list[float]) -> threading.Thread:
    """SIGTERM to this process once ``condition`` holds (checked from another thread)."""

    def watch() -> None:
        deadline = time.monotonic() + 20
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


class Sidecar(ServedApp):
    """``POST /jobs``: ``status`` (503: no agent has room) forever, or, ``silent``, no answer for a
    minute."""

    def __init__(self, *, silent: bool = False, status: int = 503) -> None:
        self.silent = silent
        self.status = status
        self.posts = 0
        app = web.Application()
        app.router.add_post("/jobs", self.submit)
        super().__init__(app)

    async def submit(self, request: web.Request) -> web.Response:
        await request.read()
        self.posts += 1
        if self.silent:
            await asyncio.sleep(60)
        return web.json_response(
            {"error": "no capacity: vm-1 full 4/4"}, status=self.status, headers={"Retry-After": "1"}
        )


@contextmanager
def serve(*, silent: bool = False, status: int = 503) -> Iterator[Sidecar]:
    sidecar = Sidecar(silent=silent, status=status)
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, list[str]]]:
    logger = logging.getLogger("test.submit_sigterm")
    logger.setLevel(logging.INFO)
    lines = Lines()
    logger.addHandler(lines)
    try:
        yield logger, lines.lines
    finally:
        logger.removeHandler(lines)


def submit(endpoint: Callable[[], SidecarEndpoint], logger: logging.Logger, **options: Any) -> dict[str, Any]:
    return submit_patiently(
        endpoint,
        {"command": "true"},
        conn_id="agentic_run_default",
        log=logger,
        backoff=Backoff(base=5.0, cap=60.0),  # every wait far longer than the budget
        **options,
    )


def test_sigterm_in_the_backoff_ends_the_wait_at_once_and_airflows_handler_still_runs(
    log: tuple[logging.Logger, list[str]],
) -> None:
    logger, lines = log
    sent: list[float] = []
    with serve() as sidecar, airflow_handler() as airflow:
        sigterm_when(lambda: any("retrying in" in line for line in lines), sent)
        with pytest.raises(TaskStopped) as stopped:
            submit(lambda: SidecarEndpoint(sidecar.url, "t"), logger)
        took = time.monotonic() - sent[0]
        assert installed() is airflow  # handed back
    assert took < STOP_BUDGET, took
    assert airflow.calls == 1  # on_kill ran, as Airflow would have run it
    reason = str(stopped.value)
    assert reason.startswith("stopped by SIGTERM while waiting to submit (1 attempt(s), the last: sidecar at")
    assert "HTTP 503" in reason and reason.endswith("; no job was started")
    assert lines[-1] == reason  # in the task's log too
    assert sidecar.posts == 1


def test_airflow_2s_own_exception_ends_the_wait_after_the_reason_is_logged(
    log: tuple[logging.Logger, list[str]],
) -> None:
    logger, lines = log
    sent: list[float] = []
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    with airflow_handler(raises=True) as airflow:
        sigterm_when(lambda: any("retrying in" in line for line in lines), sent)
        with pytest.raises(AirflowTerminated):
            submit(lambda: SidecarEndpoint(url, "t"), logger, terminated=lambda reason: TaskStopped(reason))
        took = time.monotonic() - sent[0]
        assert installed() is airflow
    assert took < STOP_BUDGET, took
    assert lines[-1].startswith("stopped by SIGTERM while waiting to submit")
    assert "unreachable: ConnectError" in lines[-1] and lines[-1].endswith("no job was started")


def test_sigterm_during_the_request_says_the_sidecar_may_have_started_a_job(
    log: tuple[logging.Logger, list[str]],
) -> None:
    logger, _ = log
    sent: list[float] = []
    with serve(silent=True) as sidecar, airflow_handler():
        sigterm_when(lambda: sidecar.posts == 1, sent)
        with pytest.raises(TaskStopped) as stopped:
            submit(lambda: SidecarEndpoint(sidecar.url, "t"), logger)
        took = time.monotonic() - sent[0]
    assert took < STOP_BUDGET, took
    reason = str(stopped.value)
    assert reason.startswith("stopped by SIGTERM while submitting (attempt 1)")
    assert "the sidecar may have started a job" in reason
    assert "the sidecar's reconciler stops it once Airflow no longer runs this task instance" in reason


def test_after_an_answer_that_was_lost_the_reason_says_a_job_may_exist(
    log: tuple[logging.Logger, list[str]],
) -> None:
    """A proxy's 504: the request may have reached the sidecar, whose answer never came back."""
    logger, lines = log
    sent: list[float] = []
    with serve(status=504) as sidecar, airflow_handler():
        sigterm_when(lambda: any("retrying in" in line for line in lines), sent)
        with pytest.raises(TaskStopped) as stopped:
            submit(lambda: SidecarEndpoint(sidecar.url, "t"), logger)
    reason = str(stopped.value)
    assert reason.startswith("stopped by SIGTERM while waiting to submit (1 attempt(s), the last: sidecar at")
    assert "HTTP 504" in reason and "an earlier submission got no answer" in reason
    assert "so the sidecar may have started a job; if it did, the sidecar's reconciler stops it" in reason


def test_sigterm_while_airflow_reads_the_connection_is_held_till_the_read_returns(
    log: tuple[logging.Logger, list[str]],
) -> None:
    """A request of Airflow's own (here: reading the connection) is never cut in half; the task
    stops as soon as it returns, before anything is sent."""
    logger, _ = log
    sent: list[float] = []
    reading = threading.Event()

    with serve() as sidecar, airflow_handler() as airflow:

        def resolve() -> SidecarEndpoint:
            reading.set()
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:  # Airflow at work: busy, then back
                pass
            return SidecarEndpoint(sidecar.url, "t")

        sigterm_when(reading.is_set, sent)
        with pytest.raises(TaskStopped, match="while waiting to submit; no job was started"):
            submit(resolve, logger)
        took = time.monotonic() - sent[0]
    assert 0.2 < took < STOP_BUDGET, took  # held until the read returned
    assert sidecar.posts == 0 and airflow.calls == 1


def test_a_submission_that_ends_without_sigterm_leaves_airflows_handler_alone(
    log: tuple[logging.Logger, list[str]],
) -> None:
    logger, _ = log
    url = f"http://127.0.0.1:{free_port()}"
    with airflow_handler() as airflow:
        with pytest.raises(SidecarError, match="still failing after 0 s"):
            submit(lambda: SidecarEndpoint(url, "t"), logger, patience=0.0)
        assert installed() is airflow
    assert airflow.calls == 0


def test_the_guard_stands_aside_where_it_cannot_help() -> None:
    """Outside the main thread (no signal arrives there), and in front of SIG_DFL (which ends the
    process at once anyway) or SIG_IGN (ignored on purpose), nothing is installed."""
    logger = logging.getLogger("test.submit_sigterm")
    for disposition in (signal.SIG_DFL, signal.SIG_IGN):
        before = signal.signal(signal.SIGTERM, disposition)
        try:
            with StopOnSigterm(lambda: "", log=logger) as stop:
                assert not stop.active and signal.getsignal(signal.SIGTERM) is disposition
        finally:
            signal.signal(signal.SIGTERM, before)
    found: list[bool] = []

    def in_a_thread() -> None:
        with StopOnSigterm(lambda: "", log=logger) as stop:
            found.append(stop.active)

    with airflow_handler():
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
    assert found == [False]
