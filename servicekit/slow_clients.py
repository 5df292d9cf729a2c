"""Connections that never send a whole request are closed: both services' listeners.

aiohttp waits without end for a request's headers, so a few hundred connections that send half a
request line (or nothing) stay open for good, unauthenticated, each holding a socket and memory. Here
every connection gets :data:`HEADER_SECONDS` to deliver its first request's headers (a request
reaching the app marks it: :func:`middleware`); one that has not is closed. From one address at most
:data:`PENDING_PER_ADDRESS` such connections wait at once: a newer one closes the oldest, so a client
that floods half-open connections crowds out only itself. A request's body has :data:`BODY_SECONDS`
(:func:`servicekit.http.read_bounded`). Connections that completed a request are aiohttp's again: an
idle keep-alive connection closes after its ``keepalive_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger("servicekit.slow_clients")

HEADER_SECONDS = 10.0  # from a connection's start to its first request's headers
BODY_SECONDS = 30.0  # a request's whole body, once its headers are in
PENDING_PER_ADDRESS = 64  # connections without a whole request yet, from one address


class Guard:
    """Connections without a request yet, by address, each with its deadline."""

    def __init__(
        self, *, header_seconds: float = HEADER_SECONDS, per_address: int = PENDING_PER_ADDRESS
    ) -> None:
        self._header_seconds = header_seconds
        self._per_address = per_address
        self._pending: dict[str, OrderedDict[asyncio.BaseTransport, asyncio.TimerHandle]] = {}
        self.closed = 0  # connections closed for want of a request (for tests and logs)

    def wrap(self, inner: asyncio.Protocol) -> asyncio.Protocol:
        return _Guarded(inner, self)

    def opened(self, transport: asyncio.BaseTransport) -> None:
        address = _address(transport)
        pending = self._pending.setdefault(address, OrderedDict())
        timer = asyncio.get_running_loop().call_later(self._header_seconds, self._expire, transport)
        pending[transport] = timer
        while len(pending) > self._per_address:
            oldest, handle = pending.popitem(last=False)
            handle.cancel()
            self._close(oldest)

    def served(self, transport: asyncio.BaseTransport | None) -> None:
        """A request reached the app on ``transport``: it is a client, no longer a pending connection."""
        if transport is not None:
            self._forget(transport)

    def gone(self, transport: asyncio.BaseTransport) -> None:
        self._forget(transport)

    def _forget(self, transport: asyncio.BaseTransport) -> None:
        address = _address(transport)
        pending = self._pending.get(address)
        if pending is None:
            return
        handle = pending.pop(transport, None)
        if handle is not None:
            handle.cancel()
        if not pending:
            del self._pending[address]

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        self._forget(transport)
        self._close(transport)

    def _close(self, transport: asyncio.BaseTransport) -> None:
        self.closed += 1
        if self.closed in (1, 100) or self.closed % 1000 == 0:  # a flood logs a few lines, not one each
            log.warning(
                "closed %d connection(s) that sent no whole request within %g s (latest from %s)",
                self.closed,
                self._header_seconds,
                _address(transport),
                extra={"action": "slow_client_closed"},
            )
        abort = getattr(transport, "abort", None)
        if callable(abort):
            abort()
        else:
            transport.close()

    def middleware(self) -> Middleware:
        guard = self

        @web.middleware
        async def mark_served(request: web.Request, handler: Handler) -> web.StreamResponse:
            guard.served(request.transport)
            return await handler(request)

        return mark_served


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, told to the guard as it opens and closes."""

    def __init__(self, inner: asyncio.Protocol, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._guard.opened(transport)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.gone(self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through ``guard``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._guard.wrap(server()),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
