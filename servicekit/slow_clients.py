"""Connections that never send a whole request are closed: both services' listeners.

Without this, connections that send half a request line (or nothing) stay open for aiohttp's
keep-alive timeout or longer, unauthenticated, each holding a socket and memory. Here every connection
gets :data:`HEADER_SECONDS` to deliver its first request's headers (a request reaching the app marks
it: :meth:`Guard.middleware`); one that has not is closed. From one address at most
:data:`PENDING_PER_ADDRESS` such connections wait at once: past it, the oldest that has waited
:data:`EVICTABLE_AFTER_SECONDS` is closed for the newer (a burst of real clients whose requests are
still unread in the kernel's buffer is young, and left alone), so a client that floods half-open
connections crowds out mostly itself. A request's body has :data:`BODY_SECONDS`
(:func:`servicekit.http.read_bounded`). A connection that completed a request is aiohttp's again: a
later request on it has until the keep-alive timeout after the last answer, and a TLS handshake has
asyncio's own bound (60 s).
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
EVICTABLE_AFTER_SECONDS = 2.0  # past the cap, a pending connection this old is closed for a newer one


class Guard:
    """Connections without a request yet, by address, each with its deadline."""

    def __init__(
        self,
        *,
        header_seconds: float = HEADER_SECONDS,
        per_address: int = PENDING_PER_ADDRESS,
        evictable_after: float = EVICTABLE_AFTER_SECONDS,
    ) -> None:
        self._header_seconds = header_seconds
        self._per_address = per_address
        self._evictable_after = evictable_after
        self._pending: dict[str, OrderedDict[_Guarded, tuple[float, asyncio.TimerHandle]]] = {}
        self._by_transport: dict[asyncio.BaseTransport, _Guarded] = {}
        self.closed = 0  # connections closed for want of a request (for tests and logs)

    def wrap(self, inner: asyncio.Protocol) -> asyncio.Protocol:
        return _Guarded(inner, self)

    def opened(self, connection: _Guarded) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending.setdefault(connection.address, OrderedDict())
        timer = loop.call_later(self._header_seconds, self._expire, connection, "no whole request within")
        pending[connection] = (loop.time(), timer)
        self._by_transport[connection.transport] = connection
        # Past the cap, the oldest go, once old enough: a burst of clients whose requests are still in
        # the kernel's buffer, not yet read, is no flood.
        now = loop.time()
        while len(pending) > self._per_address:
            oldest, (since, _) = next(iter(pending.items()))
            if now - since < self._evictable_after:
                break
            self._expire(oldest, "too many connections without a request from its address, the oldest after")

    def served(self, transport: asyncio.BaseTransport | None) -> None:
        """A request reached the app on ``transport``: it is a client, no longer a pending connection."""
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is not None:
            self.gone(connection)

    def gone(self, connection: _Guarded) -> None:
        self._by_transport.pop(connection.transport, None)
        pending = self._pending.get(connection.address)
        if pending is None:
            return
        entry = pending.pop(connection, None)
        if entry is not None:
            entry[1].cancel()
        if not pending:
            del self._pending[connection.address]

    def _expire(self, connection: _Guarded, why: str) -> None:
        self.gone(connection)
        self.closed += 1
        if self.closed in (1, 100) or self.closed % 1000 == 0:  # a flood logs a few lines, not one each
            log.warning(
                "closed %d connection(s) that sent no whole request (latest from %s: %s %g s)",
                self.closed,
                connection.address,
                why,
                self._header_seconds if why.startswith("no whole") else self._evictable_after,
                extra={"action": "slow_client_closed"},
            )
        try:
            abort = getattr(connection.transport, "abort", None)
            if callable(abort):
                abort()
            else:
                connection.transport.close()
        except Exception:  # a transport already closing: nothing left to close
            log.debug("closing a slow client's connection failed", exc_info=True)

    def middleware(self) -> Middleware:
        guard = self

        @web.middleware
        async def mark_served(request: web.Request, handler: Handler) -> web.StreamResponse:
            guard.served(request.transport)
            return await handler(request)

        return mark_served


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, told to the guard as it opens and closes. The peer's
    address is read once, as it opens: a closed TLS transport no longer says it."""

    def __init__(self, inner: asyncio.Protocol, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard
        self.transport: asyncio.BaseTransport
        self.address = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        try:
            self._guard.opened(self)
        finally:
            self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._guard.gone(self)
        finally:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through ``guard``, each served by a ``protocol`` (aiohttp's
    :class:`~aiohttp.web.RequestHandler`, or a subclass) made with the runner's settings."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: Guard,
        protocol: type[web.RequestHandler] = web.RequestHandler,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._guard = guard
        self._protocol = protocol

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def connection() -> asyncio.Protocol:
            # What ``server()`` does, with our class: the runner's settings are the server's kwargs.
            return self._guard.wrap(self._protocol(server, loop=loop, **server._kwargs))

        self._server = await loop.create_server(
            connection,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
