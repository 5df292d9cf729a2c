"""AgentClient against the real agent, against nothing, and against a server that answers garbage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TypeVar

import aiohttp
import pytest
from aiohttp import web

from agent_api.client import (
    AgentClient,
    AgentError,
    AgentRejected,
    AgentUnavailable,
    JobNotFound,
    RunPayload,
)
from harness.agent import AgentProcess
from harness.processes import free_port

T = TypeVar("T")
TOKEN = "client-test-token-5678"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path_factory.mktemp("agent-client") / "home", token=TOKEN) as proc:
        yield proc


def with_client(url: str, scenario: Callable[[AgentClient], Awaitable[T]], *, token: str = TOKEN) -> T:
    async def main() -> T:
        async with AgentClient(url, token, timeout=2.0) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_run_get_log_stop_and_health_against_the_real_agent(agent: AgentProcess) -> None:
    job_id = f"client-{uuid.uuid4().hex[:8]}"

    async def scenario(client: AgentClient) -> None:
        health = await client.health()
        assert (health["status"], health["agent_id"]) == ("ok", "test-agent")
        started = await client.run(job_id, RunPayload(command="echo started; sleep 300"))
        assert (started.job_id, started.status, started.rc) == (job_id, "RUNNING", None)
        assert started.pid is not None and started.started_at is not None and started.finished_at is None
        assert await client.get(job_id) == started
        while (await client.log(job_id)).data != b"started\n":
            await asyncio.sleep(0.02)
        result = await client.stop(job_id, reason="client test")
        assert (result.ok, result.action, result.signal, result.rc) == (True, "terminated", "SIGTERM", -15)
        final = await client.get(job_id)
        assert (final.status, final.rc, final.reason) == ("FAILED", -15, "client test")
        assert final.finished_at is not None

    with_client(agent.url, scenario)


def test_run_accepts_a_plain_mapping_payload(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> None:
        info = await client.run(f"client-{uuid.uuid4().hex[:8]}", {"command": "exit 0", "env": {"A": "1"}})
        assert info.status in ("RUNNING", "SUCCEEDED")

    with_client(agent.url, scenario)


def test_unknown_job_raises_job_not_found(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> None:
        for call in (client.get("never-ran"), client.log("never-ran")):
            with pytest.raises(JobNotFound) as caught:
                await call
            assert caught.value.status == 404 and "never-ran" in caught.value.message
        # A stop is the exception: it leaves a tombstone (tests/test_start_stop_races.py).
        assert (await client.stop("never-ran")).action == "already_finished"

    with_client(agent.url, scenario)


def test_refused_requests_raise_agent_rejected_with_the_servers_message(agent: AgentProcess) -> None:
    job_id = f"client-{uuid.uuid4().hex[:8]}"

    async def scenario(client: AgentClient) -> None:
        await client.run(job_id, RunPayload(command="exit 0"))
        with pytest.raises(AgentRejected) as duplicate:
            await client.run(job_id, RunPayload(command="exit 0"))
        assert duplicate.value.status == 409 and "already exists" in duplicate.value.message
        with pytest.raises(AgentRejected) as bad:
            await client.run("client-bad-payload", {"command": "true", "timeout_seconds": -5})
        assert bad.value.status == 400 and "timeout_seconds" in bad.value.message
        assert not isinstance(bad.value, AgentUnavailable)

    with_client(agent.url, scenario)


def test_wrong_token_raises_agent_rejected_without_showing_either_token(agent: AgentProcess) -> None:
    wrong = "wrong-token-abcdef"

    async def scenario(client: AgentClient) -> None:
        with pytest.raises(AgentRejected) as caught:
            await client.get("any-job")
        assert caught.value.status == 401
        assert wrong not in str(caught.value) and TOKEN not in str(caught.value)

    with_client(agent.url, scenario, token=wrong)


@pytest.mark.fast
def test_nothing_listening_raises_agent_unavailable_without_the_token() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def scenario(client: AgentClient) -> None:
        for call in (client.health(), client.get("job-1"), client.stop("job-1"), client.log("job-1")):
            with pytest.raises(AgentUnavailable) as caught:
                await call
            assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value)
            assert url in str(caught.value)

    with_client(url, scenario)


@pytest.mark.fast
def test_invalid_job_ids_are_refused_before_any_request() -> None:
    async def scenario(client: AgentClient) -> None:
        for bad in ("../etc", "", "a/b", "x" * 129):
            with pytest.raises(ValueError, match="job_id"):
                await client.get(bad)

    with_client(f"http://127.0.0.1:{free_port()}", scenario)


# A stand-in server for answers the real agent never gives.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def fake_agent(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def against_fake(handler: Handler, call: Callable[[AgentClient], Awaitable[object]]) -> AgentError:
    async def main() -> AgentError:
        async with (
            fake_agent(handler) as url,
            AgentClient(url, TOKEN, timeout=0.5, stop_timeout=0.5) as client,
        ):
            with pytest.raises(AgentError) as caught:
                await call(client)
            return caught.value

    return asyncio.run(main())


async def garbage_job(request: web.Request) -> web.Response:
    return web.json_response({"job_id": "j", "status": "DANCING", "pid": "12"})


async def not_json(request: web.Request) -> web.Response:
    return web.Response(text="<html>proxy error</html>")


async def server_error(request: web.Request) -> web.Response:
    # Not 503: the agent's own 503 to /run is AgentBusy (tests/test_agent_capacity.py).
    return web.json_response({"error": f"boom {request.headers.get('Authorization')}"}, status=500)


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.json_response({})


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (garbage_job, "unexpected answer"),
        (not_json, "not JSON"),
        (server_error, "HTTP 500"),
        (slow, "no answer"),
    ],
)
@pytest.mark.fast
def test_unusable_answers_raise_agent_unavailable(handler: Handler, expected: str) -> None:
    for call in (
        lambda c: c.get("job-1"),
        lambda c: c.stop("job-1"),
        lambda c: c.run("job-1", {"command": "x"}),
    ):
        error = against_fake(handler, call)
        assert isinstance(error, AgentUnavailable), error
        assert expected in str(error)
        assert TOKEN not in str(error)


@pytest.mark.fast
def test_log_answer_without_size_headers_is_agent_unavailable() -> None:
    async def bare_log(request: web.Request) -> web.Response:
        return web.Response(body=b"data")

    error = against_fake(bare_log, lambda c: c.log("job-1"))
    assert isinstance(error, AgentUnavailable) and "X-Log-Size" in str(error)


@pytest.mark.fast
def test_an_answer_past_its_size_bound_is_refused_without_being_read_whole() -> None:
    """Whatever answers at an agent's URL cannot make the sidecar hold its answer in memory: a health
    answer of 200 MB (declared, or streamed without a length) is refused once past 1 MiB."""
    sent: list[int] = []

    async def declared(request: web.Request) -> web.Response:
        return web.Response(body=b" " * (8 * 1024 * 1024), content_type="application/json")

    async def streamed(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse()
        answer.enable_chunked_encoding()
        await answer.prepare(request)
        chunk = b" " * (1024 * 1024)
        try:
            for _ in range(200):
                await answer.write(chunk)
                sent.append(len(chunk))
        except (ConnectionError, RuntimeError):  # the client hung up
            pass
        return answer

    error = against_fake(declared, lambda c: c.health())
    assert isinstance(error, AgentUnavailable) and "more than the 1048576" in str(error), error
    error = against_fake(streamed, lambda c: c.health())
    assert isinstance(error, AgentUnavailable) and "longer than the 1048576" in str(error), error
    assert sum(sent) < 100 * 1024 * 1024  # the client stopped reading long before the end


@pytest.mark.fast
def test_a_session_passed_in_stays_open() -> None:
    async def main() -> bool:
        async with aiohttp.ClientSession() as session:
            async with AgentClient(f"http://127.0.0.1:{free_port()}", TOKEN, session=session):
                pass
            return session.closed

    assert asyncio.run(main()) is False
