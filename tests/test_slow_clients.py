"""Connections that never send a whole request are closed, by both services, and crowd out no client.

Real agent and sidecar processes, through TCP only: 300 connections to each that send half a request
line and then nothing (no token needed to do that). Each service's /healthz still answers within 2 s,
and at least 90 % of those connections are closed by the server within 60 s (servicekit.slow_clients:
a connection has 10 s for its first request's headers, and at most 64 wait at once from one address).
A body sent too slowly is answered 408 (in process, with a short bound).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from harness.agent import AgentProcess
from harness.served import ServedAirflow
from harness.sidecar import SidecarProcess
from servicekit import http as servicekit_http
from servicekit.http import HttpError, read_bounded
from servicekit.slow_clients import Guard

HALF_OPEN = 300


def half_open(port: int, count: int) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        connection.setblocking(False)
        connections.append(connection)
    return connections


def closed(connections: list[socket.socket]) -> int:
    count = 0
    for connection in connections:
        try:
            count += connection.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            count += 1
    return count


def test_half_sent_requests_are_closed_and_healthz_answers_meanwhile(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    with (
        AgentProcess(tmp_path / "agent") as agent,
        SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[],
            api_version="v2",
        ) as sidecar,
    ):
        connections = {
            name: half_open(port, HALF_OPEN)
            for name, port in (("agent", agent.port), ("sidecar", sidecar.port))
        }
        try:
            for url in (agent.url, sidecar.url):
                started = time.monotonic()
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                assert time.monotonic() - started < 2.0, url
            deadline = time.monotonic() + 60
            while any(closed(held) < 0.9 * HALF_OPEN for held in connections.values()):
                assert time.monotonic() < deadline, {name: closed(held) for name, held in connections.items()}
                time.sleep(0.5)
            for url in (agent.url, sidecar.url):
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            assert "sent no whole request" in agent.log_text() + sidecar.log_path.read_text()
        finally:
            for held in connections.values():
                for connection in held:
                    connection.close()


@pytest.mark.fast
def test_a_body_that_does_not_arrive_in_time_is_a_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servicekit_http, "BODY_SECONDS", 0.3)

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await read_bounded(request, 1024, HttpError(413, "too large"))
        except HttpError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        return web.json_response({"bytes": len(body)})

    async def scenario() -> tuple[bytes, float]:
        app = web.Application()
        app.router.add_post("/", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # 1 byte of 100
            await writer.drain()
            started = time.monotonic()
            answer = await asyncio.wait_for(reader.read(4096), 5)
            writer.close()
            return answer, time.monotonic() - started
        finally:
            await server.close()

    answer, took = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 408") and b"not received within" in answer, answer
    assert took < 2.0


class FakeTransport(asyncio.Transport):
    """A peer at ``address``; like a TLS transport, it no longer names its peer once closed."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.peer: tuple[str, int] | None = (address, 40000)
        self.aborted = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@pytest.mark.fast
def test_the_guard_forgets_a_closed_tls_connection_and_spares_a_burst_of_real_clients() -> None:
    async def scenario() -> None:
        guard = Guard(header_seconds=5.0, per_address=4, evictable_after=0.2)
        # A TLS connection closed by its peer before any request: its transport names no peer by then.
        transport, inner = FakeTransport("10.0.0.9"), Inner()
        protocol = guard.wrap(inner)
        protocol.connection_made(transport)
        transport.peer = None
        protocol.connection_lost(None)
        assert inner.lost and not guard._pending and not guard._by_transport
        # A burst of ten from one address, their requests not read yet: young, none closed.
        burst = [FakeTransport("10.0.0.1") for _ in range(10)]
        for one in burst:
            guard.wrap(Inner()).connection_made(one)
        assert not any(one.aborted for one in burst) and guard.closed == 0
        await asyncio.sleep(0.3)  # now they have waited: the next one closes the oldest past the cap
        guard.wrap(Inner()).connection_made(FakeTransport("10.0.0.1"))
        assert [one.aborted for one in burst] == [True] * 7 + [False] * 3
        assert guard.closed == 7

    asyncio.run(scenario())
