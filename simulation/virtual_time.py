"""An asyncio event loop on virtual time: nothing waits on the wall clock.

When no callback is ready, the loop jumps its clock to the next timer instead of sleeping, so an hour
of ``asyncio.sleep`` and ``wait_for`` passes in microseconds, and always in the same order. Blocking
calls sent to threads (``asyncio.to_thread``) run inline, on the loop's thread: the simulated router
DB never blocks, and no thread's timing can reorder what happens.

Determinism holds as long as nothing does real I/O (the loop's own wake-up pipe aside, which is
polled without waiting).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each call at once, on the caller's thread (asyncio insists on a ThreadPoolExecutor)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # delivered to the awaiting coroutine, as a thread's would be
            future.set_exception(exc)
        return future


class _VirtualSelector(selectors.DefaultSelector):
    """Polls without waiting; a wait for ``timeout`` seconds moves the clock instead."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready:
            if timeout is None:
                raise Deadlock("every task waits and no timer is set: the world would hang")
            self._clock.now += max(0.0, timeout)
        return ready


class Deadlock(RuntimeError):
    """Nothing can ever run again."""


class VirtualClock:
    """Seconds since the world began."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.clock = VirtualClock()
        super().__init__(_VirtualSelector(self.clock))
        self.set_default_executor(_InlineExecutor(max_workers=1))
        # A timer due within a microsecond runs now: a jump of ``when - now`` may land a rounding
        # error short of ``when``.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        return self.clock.now


async def _settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


def run(main: Callable[[VirtualLoop], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(loop)`` to its end on a fresh virtual loop, then close the loop."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        # What is left (a stop's retries, say) is cancelled, as a process's tasks die with it.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(_settle(left))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
