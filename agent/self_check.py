"""Automatic maintenance: an agent that cannot run a job well takes no new one until it recovers.

Every :data:`SELF_CHECK_SECONDS` the agent writes a probe file in its home (a full or read-only disk,
or a hung mount, fails it) and reads how much is free on the disk under its home. Below ``[agent]
min_free_disk_bytes``, or failing the write twice in a row, it is **unwell**: ``POST /run`` answers
503 with the reason (the sidecar places the job elsewhere), running jobs go on, and ``/healthz``,
``/readyz`` and each heartbeat say why (``unwell``), so the sidecar routes around it and shows the
reason as the agent's maintenance. Once both hold again it takes jobs again, by itself. Nothing is
kept on disk: a restarted agent checks afresh before it listens.

:func:`problems` decides; :class:`SelfCheck` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent_api.maintenance import MAX_UNWELL_CHARS, Unwell

log = logging.getLogger(__name__)

SELF_CHECK_SECONDS = 5.0
WRITE_TIMEOUT_SECONDS = 5.0  # a home that takes longer to take a small file is a hung mount
WRITE_FAILURES = 2  # in a row: a home this many checks failed to write to is not writable


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def problems(
    *, home: Path, free_bytes: int | None, min_free_bytes: int, write_error: str | None
) -> dict[str, str]:
    """Why the agent must take no new job now, by kind (``not_writable``, ``disk_full``; empty: none)."""
    found = {}
    if write_error is not None:
        found["not_writable"] = f"home {home} is not writable: {write_error}"
    if free_bytes is not None and min_free_bytes and free_bytes < min_free_bytes:
        found["disk_full"] = (
            f"the disk under {home} is nearly full: {_size(free_bytes)} free, under "
            f"[agent] min_free_disk_bytes {_size(min_free_bytes)}"
        )
    return found


def write_probe(home: Path) -> None:
    """Create, write and remove a small file in ``home``: what a job's start needs. No fsync: a busy
    disk's writeback may hold one for seconds, and a full or read-only file system refuses the write
    itself."""
    fd, name = tempfile.mkstemp(prefix=".ready-", dir=home)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(name)


class SelfCheck:
    """Checks the home every :data:`SELF_CHECK_SECONDS`; ``changed`` is told of each new verdict."""

    def __init__(
        self, home: Path, *, min_free_bytes: int, changed: Callable[[Unwell | None], None] = lambda _: None
    ) -> None:
        self.home = home
        self.min_free_bytes = min_free_bytes
        self.unwell: Unwell | None = None
        self._kinds: tuple[str, ...] = ()
        self._write_failures = 0
        self._changed = changed

    async def check(self) -> Unwell | None:
        write_error = None
        try:
            await asyncio.wait_for(asyncio.to_thread(write_probe, self.home), WRITE_TIMEOUT_SECONDS)
        except TimeoutError:
            write_error = f"a small write took longer than {WRITE_TIMEOUT_SECONDS:g} s"
        except OSError as exc:
            write_error = exc.strerror or str(exc)
        try:
            free: int | None = (await asyncio.to_thread(shutil.disk_usage, self.home)).free
        except OSError:
            free = None  # the write probe says what is wrong with the home
        # One slow or failed write may be a passing stall: only two in a row make the agent unwell.
        self._write_failures = self._write_failures + 1 if write_error is not None else 0
        found = problems(
            home=self.home,
            free_bytes=free,
            min_free_bytes=self.min_free_bytes,
            write_error=write_error if self._write_failures >= WRITE_FAILURES else None,
        )
        kinds = tuple(sorted(found))
        if not found:
            if self.unwell is not None:
                log.warning("the agent takes jobs again: %s no longer holds", self.unwell.reason,
                            extra={"action": "agent_well"})  # fmt: skip
                self.unwell, self._kinds = None, ()
                self._changed(None)
            return None
        since = self.unwell.since if self.unwell is not None else datetime.now(UTC)
        reason = "; ".join(found.values())  # the free bytes as of now; a long home path cut short
        self.unwell = Unwell(
            reason if len(reason) <= MAX_UNWELL_CHARS else reason[: MAX_UNWELL_CHARS - 3] + "...", since
        )
        if kinds != self._kinds:  # told (and logged) when what is wrong changes, not its figures
            self._kinds = kinds
            log.error("the agent takes no new job until it recovers: %s", self.unwell.reason,
                      extra={"action": "agent_unwell"})  # fmt: skip
            self._changed(self.unwell)
        return self.unwell

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SELF_CHECK_SECONDS)
            try:
                await self.check()
            except Exception:  # a check that fails for its own reasons must not end the agent
                log.exception("the agent's self-check failed")
