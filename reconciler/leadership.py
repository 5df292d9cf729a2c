"""One leader among replicas: the holder of a lease row in the router DB runs the poll loop.

Every replica campaigns for the lease; the winner runs the loop (a *term*) and renews every third of
the lease, by the router DB's clock. A term ends at once, its loop cancelled mid-cycle, when a renewal
is refused (another replica holds the lease) or when no renewal has succeeded for nearly a whole
lease: by then the lease may be about to pass to a standby, and two loops must never run together.
Standbys keep serving the HTTP API; only the loop is the leader's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from reconciler.config import LeaderConfig
from reconciler.metrics import Metrics
from router_db import RouterDB

log = logging.getLogger("reconciler.leadership")

# The leader's work (the poll loop): returns once its event is set.
Term = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def holder_id() -> str:
    """``hostname:pid:random``: unique per process, and readable in the leases table."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Leadership:
    def __init__(
        self, *, db: RouterDB, metrics: Metrics, config: LeaderConfig, holder: str | None = None
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._config = config
        self.holder = holder or holder_id()
        self.is_leader = False
        self._held = False  # the lease may be ours in the router DB (release it on shutdown)

    @property
    def _ttl(self) -> float:
        return self._config.lease_seconds

    @property
    def _margin(self) -> float:
        # A term ends this long before the lease could expire: room for the loop to notice.
        return min(1.0, self._ttl / 5)

    async def run(self, stopping: asyncio.Event, term: Term) -> None:
        """Campaign for the lease until ``stopping``; while it is ours, run ``term``."""
        self._metrics.leader.set(0)
        # Standbys ask often enough to take over soon after the lease expires.
        campaign_every = min(self._ttl / 3, 1.0)
        while not stopping.is_set():
            asked = time.monotonic()
            if await self._acquire(timeout=self._ttl / 3) is True:
                log.info("leader: lease %r taken by %s", self._config.lease_name, self.holder)
                await self._lead(stopping, term, valid_until=asked + self._ttl)
                continue
            await _wait(stopping, campaign_every)

    async def release(self) -> None:
        """Give the lease up (graceful shutdown), so that a standby takes over at once."""
        if not self._held:
            return
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self._db.release_lease, self._config.lease_name, self.holder), timeout=5
            )
            self._held = False
            log.info("leader: lease %r released", self._config.lease_name)
        except Exception as exc:  # it expires on its own
            log.warning(
                "leader: could not release the lease: %s", type(exc).__name__, extra={"error": str(exc)}
            )

    async def _lead(self, stopping: asyncio.Event, term: Term, *, valid_until: float) -> None:
        term_over = asyncio.Event()
        self.is_leader = True
        self._metrics.leader.set(1)
        task = asyncio.create_task(term(term_over), name="leader-term")
        lost = False
        renewed = time.monotonic()
        try:
            while not stopping.is_set() and not task.done():
                due = renewed + self._ttl / 3
                await _wait_any(stopping, task, max(0.0, due - time.monotonic()))
                if stopping.is_set() or task.done():
                    break
                asked = time.monotonic()
                outcome = await self._acquire(timeout=max(0.05, valid_until - self._margin - asked))
                if outcome is True:
                    renewed, valid_until = asked, asked + self._ttl
                elif outcome is False:
                    log.error(
                        "leader: lease %r taken by another replica; stopping the loop",
                        self._config.lease_name,
                    )
                    lost = True
                elif time.monotonic() >= valid_until - self._margin:
                    log.error(
                        "leader: lease %r could not be renewed in time; stopping the loop",
                        self._config.lease_name,
                    )
                    lost = True
                else:
                    renewed = time.monotonic() - self._ttl / 3 + min(0.5, self._ttl / 10)  # retry soon
                if lost:
                    break
        finally:
            term_over.set()
            if lost or not stopping.is_set():
                task.cancel()  # at once: the lease may pass to a standby within the margin
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.error("leader: the loop failed", exc_info=task.exception())
            self.is_leader = False
            self._metrics.leader.set(0)

    async def _acquire(self, *, timeout: float) -> bool | None:
        """Take or renew the lease: True if ours, False if someone else's, None if the DB failed."""
        try:
            won = await asyncio.wait_for(
                asyncio.to_thread(
                    self._db.acquire_lease, self._config.lease_name, self.holder, self._config.lease_seconds
                ),
                timeout=timeout,
            )
        except Exception as exc:  # the router DB is down or slow: this replica cannot know
            log.warning("leader: lease check failed: %s", type(exc).__name__, extra={"error": str(exc)})
            self._held = True  # a late commit may still have taken it: release on shutdown regardless
            return None
        self._held = self._held or won
        return won


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)


async def _wait_any(event: asyncio.Event, task: asyncio.Task[None], timeout: float) -> None:
    waiter = asyncio.create_task(event.wait())
    try:
        await asyncio.wait([waiter, task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
