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
