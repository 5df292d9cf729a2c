"""The router DB's time in async code, read at most once per ``period`` and carried forward on this
process's monotonic clock.

A job's ``created_at`` is written by the router DB's clock (router_db.clock); its age must be measured
on that clock too, never on this replica's wall clock, which may run minutes ahead or behind. Reading
the DB for every age would cost a round trip per agent report; the monotonic clock does not jump, so
one read every few seconds carries the DB's time forward exactly enough.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

PERIOD_SECONDS = 5.0


class DbTime:
    def __init__(
        self,
        read: Callable[[], datetime],
        *,
        period: float = PERIOD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read  # RouterDB.now: blocking, run in a thread
        self._clock = clock
        self._period = period
        self._last: tuple[datetime, float] | None = None  # (the DB's time, monotonic time read)

    async def now(self) -> datetime:
        at = self._clock()
        if self._last is None or at - self._last[1] >= self._period:
            self._last = (await asyncio.to_thread(self._read), self._clock())
        base, read_at = self._last
        return base + timedelta(seconds=self._clock() - read_at)

    def age(self, moment: datetime, now: datetime) -> float:
        return (now - moment).total_seconds()
