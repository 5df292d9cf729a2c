"""Serving an aiohttp app until SIGTERM or SIGINT, the same way in both services.

    stopping = shutdown_requested()
    async with serving(app, host=..., port=..., ssl_context=...):
        await stopping.wait()          # or: run the service's own loop until ``stopping`` is set

Leaving the block stops accepting connections and gives requests in flight ``grace`` seconds; a
second signal cuts every wait short (the main task is cancelled).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import ERROR, RequestHandler

from servicekit.http import MAX_HEADER_BYTES, MAX_HEADERS, MAX_TARGET_BYTES, bounded_query
from servicekit.slow_clients import Guard, GuardedSite

# No headers in the access log: they carry tokens.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'

log = logging.getLogger("servicekit.serve")

KEEPALIVE_SECONDS = 30.0  # an idle keep-alive connection, after its last answer (aiohttp's: 75 s)


def beyond_loopback(host: str) -> bool:
    """Whether a listener on ``host`` can be reached from other machines: any address but a loopback
    one (``0.0.0.0`` and ``::`` are every interface), and any name but ``localhost``."""
    if host.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True  # a host name: whatever it resolves to now or later


def shutdown_requested() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call inside the running loop, from the main task).

    A second signal cancels the main task: the person who sends it does not want to wait for the
    work under way (stops in flight resume after the restart, from the router DB)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal() -> None:
        if stopping.is_set() and main is not None:
            main.cancel("a second signal: shutting down at once")
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return stopping


class _QuotesNoRequest(logging.Filter):
    """aiohttp logs a request it cannot parse with its exception, whose text quotes the request's bytes
    (a header carrying a token among them): the line stays, without the quote or the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = (
                "refused a request that could not be parsed (%s, HTTP %s)",
                (
                    type(exc).__name__,
                    exc.code,
                ),
            )
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("aiohttp.server").addFilter(_QuotesNoRequest())


def _unparsed_said(text: str) -> str:
    """What a request aiohttp could not parse is told, from aiohttp's own message (which quotes the
    request's bytes, so it is read, never repeated)."""
    if text.startswith("Got more than"):
        return (
            f"a line of the request is too long (the path and query take at most {MAX_TARGET_BYTES:,} "
            f"bytes, a header {MAX_HEADER_BYTES:,})"
        )
    if text.startswith("Too many headers"):
        return f"the request has more than {MAX_HEADERS} headers"
    return "the request is not well-formed HTTP/1.1"


class _Unparsed(web.Request):
    """The request aiohttp makes for bytes it could not parse. No middleware sees it, and aiohttp
    answers it in plain text; its answer is turned into the JSON error shape both APIs document."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        if isinstance(response, web.Response) and 400 <= response.status < 500:
            body = json.dumps({"error": _unparsed_said(response.text or "")}).encode()
            response.body, response.content_type = body, "application/json"
            response.headers["Content-Length"] = str(len(body))  # it still held the plain text's
        await super()._prepare_hook(response)


def _answer_unparsed_in_json(runner: web.AppRunner) -> None:
    """Requests aiohttp cannot parse are made as :class:`_Unparsed` (each connection's handler reads
    the server's factory when it opens, after setup)."""
    server, app = runner.server, runner.app
    assert server is not None
    made = server.request_factory

    def factory(
        message: Any, payload: Any, protocol: RequestHandler, writer: Any, task: Any
    ) -> web.BaseRequest:
        if message is ERROR:
            return app._make_request(message, payload, protocol, writer, task, _cls=_Unparsed)
        return made(message, payload, protocol, writer, task)

    server.request_factory = factory


@asynccontextmanager
async def serving(
    app: web.Application,
    *,
    host: str,
    port: int,
    ssl_context: SSLContext | None,
    grace: float = 10.0,
) -> AsyncIterator[web.AppRunner]:
    if ssl_context is None and beyond_loopback(host):
        log.warning(
            "listening on %s:%d without TLS, reachable beyond this machine: tokens and job data cross "
            "the network in clear text; set tls_cert_file and tls_key_file, or listen on 127.0.0.1 "
            "behind a TLS proxy",
            host,
            port,
            extra={"action": "plain_http_beyond_loopback"},
        )
    guard = Guard()  # connections that send no whole request are closed (servicekit.slow_clients)
    # Before the app's own (its token check among them): a query past its bound is refused unread.
    app.middlewares[:0] = [guard.middleware(), bounded_query()]
    runner = web.AppRunner(
        app,
        access_log_format=ACCESS_LOG_FORMAT,
        shutdown_timeout=grace,
        keepalive_timeout=KEEPALIVE_SECONDS,
        max_line_size=MAX_TARGET_BYTES,  # aiohttp's name; what it bounds is the URL (path and query)
        max_field_size=MAX_HEADER_BYTES,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    _answer_unparsed_in_json(runner)
    try:
        site = GuardedSite(runner, host, port, ssl_context=ssl_context, guard=guard)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()
