"""A TCP proxy on 127.0.0.1 that a test can cut, as a network partition cuts a link.

Cut, it forwards nothing and answers nothing: bytes already sent on open connections go nowhere,
and new connections are accepted (the kernel completes the handshake) but hear nothing back, as
packets dropped on the way do; a client finds out only through its own timeouts. Healed, the
connections held meanwhile are closed (their peers' retries open new ones) and new ones flow again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from harness.processes import free_port

CHUNK = 65536


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``, from its own event loop in a thread."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()  # set: forwarding; clear: cut
        self._healed = asyncio.Event()  # set at the end of each cut
        self._held: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(timeout=10)

    async def _cut(self) -> None:
        self._healed = asyncio.Event()
        self._open.clear()

    def heal(self) -> None:
        asyncio.run_coroutine_threadsafe(self._heal(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_held()

    async def _heal(self) -> None:
        self._close_held()
        self._healed.set()
        self._open.set()

    def _close_held(self) -> None:
        for writer in list(self._held):
            writer.transport.abort()
        self._held.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()  # a connection made while cut hears nothing until healed
            if writer.is_closing():
                return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
            self._held.add(upstream)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            for end in (writer, upstream):
                if end is not None:
                    self._held.discard(end)
                    end.transport.abort()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(CHUNK):
                if not self._open.is_set():  # cut: what was sent is lost, and nothing more flows
                    await self._healed.wait()  # then the connection is gone (closed by the heal)
                    return
                sink.write(data)
                await sink.drain()
        sink.close()
