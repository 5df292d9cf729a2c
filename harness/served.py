"""An aiohttp app served on loopback from its own event loop in a thread: stand-ins for tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from bench.standins import AirflowStandIn, recorded_task_instance
from harness.processes import free_port


class ServedApp:
    """Serves ``app`` on 127.0.0.1 while a synchronous test drives other processes against it."""

    def __init__(self, app: web.Application) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)

    async def _serve(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the serving loop: state the handlers read changes between requests."""
        self._loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class ServedAirflow(ServedApp):
    """The Airflow stand-in of ``bench.standins`` (REST API v2, recorded answers) on a loopback port,
    served by its own event loop in a thread."""

    def __init__(self) -> None:
        self.standin = AirflowStandIn(recorded_task_instance())
        super().__init__(self.standin.app())

    def mark(self, key: tuple[str, str, str, int], state: str) -> None:
        """A person marks the task instance ``key`` (dag_id, run_id, task_id, map_index): new state,
        updated now."""
        self.call_soon(self.standin.flip, [key], state)

    def mark_before_the_poll_sees_it(self, key: tuple[str, str, str, int], state: str) -> None:
        """As :meth:`mark`, but only a direct read of ``key`` sees it: what the sidecar's confirmation
        reads in the moment before its next poll would, held open for as long as the test needs."""
        self.call_soon(self.standin.direct_only.__setitem__, key, state)
