"""Per-client token buckets for an HTTP API (the sidecar limits its router API with them).

A client is whatever the caller says it is (the server passes the matched token's index, or the
remote address when no valid token was sent). Each client has a bucket of ``burst`` tokens refilled at
``rate`` per second; a request takes one, and a request finding the bucket empty is refused with the
whole seconds until a token is back. The clock is injectable so tests need not sleep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_CLIENTS = 10_000  # beyond this, full buckets (clients idle long enough) are forgotten


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0; do not build a RateLimiter to disable limiting")
        self._rate = rate
        self._burst = float(burst) if burst > 0 else max(1.0, rate)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, client: str) -> int:
        """Take a token for ``client``: 0 if granted, else the seconds (>= 1) to wait before retrying."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._forget_idle(now)
            while len(self._buckets) >= MAX_CLIENTS:  # a flood of fresh clients: forget the oldest
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[client] = _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self._rate))

    def _forget_idle(self, now: float) -> None:
        # A bucket that has refilled is indistinguishable from a new one: dropping it loses nothing.
        for client, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.at) * self._rate >= self._burst:
                del self._buckets[client]
