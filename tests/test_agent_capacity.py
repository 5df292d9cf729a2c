"""Capacity (``max_jobs``) and drain, against real agent processes: what the sidecar relies on to send a
job elsewhere (a 503 that recorded nothing), and what an operator relies on to stop a VM (a drained
agent's running jobs finish, or are stopped, while it takes no new one, and it stays drained)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiohttp import web

from agent.config import ConfigError, load_config
from agent_api.client import (
    AgentBusy,
    AgentClient,
    AgentRejected,
    AgentUnavailable,
    DrainState,
    JobInfo,
    RunPayload,
)
from harness.agent import AgentProcess
from harness.processes import wait_until
from tests.test_agent_client import against_fake
from tests.test_agent_restart import leftovers

T = TypeVar("T")


def call(agent: AgentProcess, scenario: Callable[[AgentClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AgentClient(agent.url, agent.token) as client:
            return await scenario(client)

    return asyncio.run(main())


def run(agent: AgentProcess, job_id: str, command: str) -> JobInfo:
    return call(agent, lambda c: c.run(job_id, RunPayload(command=command)))


def refused(agent: AgentProcess, job_id: str) -> AgentBusy:
    """The agent's answer to a new job, which must be AgentBusy."""
    with pytest.raises(AgentBusy) as caught:
        run(agent, job_id, "true")
    return caught.value


def status(agent: AgentProcess, job_id: str) -> str:
    return call(agent, lambda c: c.get(job_id)).status


def open_get(agent: AgentProcess, path: str) -> httpx.Response:
    return httpx.get(agent.url + path, timeout=10)


def job_dirs(agent: AgentProcess) -> set[str]:
    return {path.name for path in (agent.home / "jobs").iterdir()}


def waits_for(go: Path) -> str:
    return f"while [ ! -e {go} ]; do sleep 0.05; done"


# ------------------------------------------------------------------------------------------ capacity


def test_a_full_agent_refuses_the_next_run_with_503_and_takes_one_again_once_a_job_ends(
    tmp_path: Path,
) -> None:
    go = tmp_path / "go"
    with AgentProcess(tmp_path / "home", max_jobs=2) as agent:
        run(agent, "first", waits_for(go))
        run(agent, "second", "sleep 300")
        busy = refused(agent, "third")
        assert (busy.status, busy.retry_after) == (503, 5.0)
        assert busy.message == "agent test-agent is full: 2 of max_jobs 2 running"
        assert isinstance(busy, AgentRejected)  # the job certainly did not start: no "unreachable"
        assert job_dirs(agent) == {"first", "second"}
        health = open_get(agent, "/healthz").json()
        assert (health["max_jobs"], health["jobs_running"], health["draining"]) == (2, 2, False)

        go.touch()
        wait_until(lambda: status(agent, "first") == "SUCCEEDED", what="the first job ended")
        assert run(agent, "third", "sleep 300").status == "RUNNING"
        assert refused(agent, "fourth").retry_after == 5.0
        call(agent, lambda c: c.stop("second", force=True))
        assert run(agent, "fourth", "true").job_id == "fourth"


def test_concurrent_runs_never_exceed_max_jobs(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "home", max_jobs=3) as agent:

        async def burst(client: AgentClient) -> list[JobInfo | BaseException]:
            runs = (client.run(f"race-{i}", RunPayload(command="sleep 300")) for i in range(12))
            return await asyncio.gather(*runs, return_exceptions=True)

        answers = call(agent, burst)
        started = [a for a in answers if isinstance(a, JobInfo)]
        busy = [a for a in answers if isinstance(a, AgentBusy)]
        assert (len(started), len(busy)) == (3, 9), answers
        assert job_dirs(agent) == {info.job_id for info in started}
        assert open_get(agent, "/healthz").json()["jobs_running"] == 3


# --------------------------------------------------------------------------------------------- drain


def test_a_draining_agent_refuses_new_runs_while_its_jobs_finish_or_are_stopped(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with AgentProcess(tmp_path / "home") as agent:
        run(agent, "finishes", waits_for(go))
        run(agent, "stopped", "sleep 300")
        drained = call(agent, lambda c: c.drain())
        assert (drained.agent_id, drained.draining, drained.jobs_running) == ("test-agent", True, 2)
        assert drained.maintenance is not None and drained.maintenance.by == "POST /drain"
        assert call(agent, lambda c: c.drain()).draining  # idempotent

        busy = refused(agent, "new")
        assert (busy.status, busy.retry_after) == (503, None)
        assert busy.message == "agent test-agent is draining: it takes no new job"
        assert "new" not in job_dirs(agent)
        ready = open_get(agent, "/readyz")
        assert (ready.status_code, ready.json()) == (
            503,
            {"status": "draining", "agent_id": "test-agent", "jobs_running": 2},
        )

        result = call(agent, lambda c: c.stop("stopped", reason="VM going away"))
        assert (result.action, result.status) == ("terminated", "FAILED")
        go.touch()
        wait_until(lambda: status(agent, "finishes") == "SUCCEEDED", what="the running job finished")
        ready = open_get(agent, "/readyz")
        assert (ready.status_code, ready.json()["status"], ready.json()["jobs_running"]) == (
            503,
            "draining",
            0,
        )
        assert open_get(agent, "/healthz").json()["draining"] is True


def test_the_drain_flag_survives_a_restart_until_undrained(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with AgentProcess(home) as agent:
        call(agent, lambda c: c.drain())
        assert agent.terminate() == 0
    with AgentProcess(home) as restarted:
        assert open_get(restarted, "/healthz").json()["draining"] is True
        refused(restarted, "after-restart")
        bad = httpx.post(
            restarted.url + "/undrain",
            content=b"[]",
            headers={"Authorization": f"Bearer {restarted.token}"},
            timeout=10,
        )
        assert bad.status_code == 400 and "JSON object" in bad.json()["error"]
        assert open_get(restarted, "/healthz").json()["draining"] is True  # a bad request changed nothing
        assert call(restarted, lambda c: c.undrain()) == DrainState(
            "test-agent", draining=False, jobs_running=0
        )
        assert run(restarted, "after-undrain", "true").job_id == "after-undrain"
        assert open_get(restarted, "/readyz").json()["status"] == "ready"
    with AgentProcess(home) as again:
        assert open_get(again, "/healthz").json()["draining"] is False
        assert not (home / "draining.json").exists()


# ------------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_with_drain_on_shutdown_seconds_waits_for_a_running_job_then_exits_0(tmp_path: Path) -> None:
    go = tmp_path / "go"
    home = tmp_path / "home"
    with AgentProcess(home, drain_on_shutdown_seconds=30) as agent:
        run(agent, "short", waits_for(go))
        agent.process.send_signal(signal.SIGTERM)
        wait_until(lambda: open_get(agent, "/healthz").json()["draining"], what="drained by SIGTERM")
        time.sleep(0.5)  # several polls: the agent waits for its job, it does not exit
        assert agent.process.poll() is None
        assert refused(agent, "during-shutdown").message.endswith("is draining: it takes no new job")
        assert status(agent, "short") == "RUNNING"  # still answering status requests
        go.touch()
        assert agent.process.wait(timeout=10) == 0
    assert json.loads((home / "jobs" / "short" / "state.json").read_text())["status"] == "SUCCEEDED"
    with AgentProcess(home) as restarted:  # a planned shutdown's drain does not outlive it
        assert open_get(restarted, "/healthz").json()["draining"] is False


def test_the_shutdown_wait_ends_after_drain_on_shutdown_seconds_and_jobs_are_adopted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with leftovers() as tracked, AgentProcess(home, drain_on_shutdown_seconds=1.0) as agent:
        run(agent, "long", "sleep 300")
        tracked.track_job(home, "long")
        started = time.monotonic()
        assert agent.terminate(timeout=10) == 0
        assert 1.0 <= time.monotonic() - started < 8
        assert all(ref.alive() for ref in tracked.refs), "the job must outlive the agent"
        with AgentProcess(home) as restarted:
            assert status(restarted, "long") == "RUNNING"
            call(restarted, lambda c: c.stop("long", force=True))


def test_a_second_signal_ends_the_shutdown_wait_at_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with leftovers() as tracked, AgentProcess(home, drain_on_shutdown_seconds=120) as agent:
        run(agent, "long", "sleep 300")
        tracked.track_job(home, "long")
        agent.process.send_signal(signal.SIGTERM)
        wait_until(lambda: open_get(agent, "/healthz").json()["draining"], what="drained by SIGTERM")
        started = time.monotonic()
        agent.process.send_signal(signal.SIGINT)
        assert agent.process.wait(timeout=10) == 1  # "stopped at once by a second signal"
        assert time.monotonic() - started < 5
        assert all(ref.alive() for ref in tracked.refs)


def test_sigterm_without_drain_on_shutdown_exits_at_once_leaving_the_job_running(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with leftovers() as tracked, AgentProcess(home) as agent:
        run(agent, "long", "sleep 300")
        tracked.track_job(home, "long")
        started = time.monotonic()
        assert agent.terminate(timeout=10) == 0
        assert time.monotonic() - started < 3
        assert all(ref.alive() for ref in tracked.refs)
        assert not (home / "draining.json").exists()  # as before: no drain without the setting
        with AgentProcess(home) as restarted:
            assert status(restarted, "long") == "RUNNING"
            assert open_get(restarted, "/healthz").json()["draining"] is False
            assert run(restarted, "next", "true").job_id == "next"
            call(restarted, lambda c: c.stop("long", force=True))


# ------------------------------------------------------------------------- configuration and client


@pytest.mark.fast
def test_max_jobs_and_drain_on_shutdown_seconds_come_from_toml_or_environment(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nmax_jobs = 4\ndrain_on_shutdown_seconds = 90\n")
    env = {"AGENTIC_AGENT_TOKEN": "t"}
    loaded = load_config(config, environ=env)
    assert (loaded.max_jobs, loaded.drain_on_shutdown_seconds) == (4, 90.0)
    overridden = load_config(config, environ=env | {"AGENTIC_AGENT_MAX_JOBS": "7"})
    assert overridden.max_jobs == 7
    defaults = load_config(None, environ=env)
    assert (defaults.max_jobs, defaults.drain_on_shutdown_seconds) == (0, 0.0)
    for key, value in (("max_jobs", "-1"), ("max_jobs", "1.5"), ("drain_on_shutdown_seconds", "-1")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, environ=env | {f"AGENTIC_AGENT_{key.upper()}": value})


async def agent_503(request: web.Request) -> web.Response:
    return web.json_response({"error": "agent x is full: 1 of max_jobs 1 running"}, status=503)


async def proxy_503(request: web.Request) -> web.Response:
    return web.Response(text="<html>503 Service Unavailable</html>", status=503)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("handler", "make_call", "expected"),
    [
        (agent_503, lambda c: c.run("job-1", {"command": "x"}), AgentBusy),
        (proxy_503, lambda c: c.run("job-1", {"command": "x"}), AgentUnavailable),  # not the agent's
        (agent_503, lambda c: c.stop("job-1"), AgentUnavailable),  # only a run can be "busy"
        (agent_503, lambda c: c.drain(), AgentUnavailable),  # the flag not saved: retry
    ],
)
def test_only_the_agents_own_503_to_a_run_is_agent_busy(
    handler: Callable[[web.Request], Awaitable[web.Response]],
    make_call: Callable[[AgentClient], Awaitable[Any]],
    expected: type[Exception],
) -> None:
    error = against_fake(handler, make_call)
    assert type(error) is expected, error
    assert "HTTP 503" in str(error)


def test_health_reports_capacity_and_the_package_version(tmp_path: Path) -> None:
    try:
        expected = version("agentic-airflow")  # the agent runs in this interpreter's environment
    except PackageNotFoundError:
        expected = "0+unknown"
    with AgentProcess(tmp_path / "home", max_jobs=5) as agent:
        health = call(agent, lambda c: c.health())
        assert {k: health[k] for k in ("status", "max_jobs", "draining", "version")} == {
            "status": "ok",
            "max_jobs": 5,
            "draining": False,
            "version": expected,
        }
