"""Many awaits, a few at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def bounded(limit: int, calls: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``calls`` with at most ``limit`` in flight, by a fixed pool of workers (not one task per
    call: a burst of thousands stays a handful of tasks), and their results in order."""
    pending = iter(enumerate(calls))
    slots: dict[int, T] = {}

    async def worker() -> None:
        for index, call in pending:
            slots[index] = await call

    await asyncio.gather(*(worker() for _ in range(min(limit, len(calls)))))
    return [slots[i] for i in range(len(calls))]
