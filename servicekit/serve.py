"""Serving an aiohttp app until SIGTERM or SIGINT, the same way in both services.

    stopping = shutdown_requested()
    async with serving(app, host=..., port=..., ssl_context=...):
        await stopping.wait()          # or: run the service's own loop until ``stopping`` is set

Leaving the block stops accepting connections and gives requests in flight ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ssl import SSLContext

from aiohttp import web

# No headers in the access log: they carry tokens.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


def shutdown_requested() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call inside the running loop)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping


@asynccontextmanager
async def serving(
    app: web.Application,
    *,
    host: str,
    port: int,
    ssl_context: SSLContext | None,
    grace: float = 10.0,
) -> AsyncIterator[web.AppRunner]:
    runner = web.AppRunner(app, access_log_format=ACCESS_LOG_FORMAT, shutdown_timeout=grace)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()
