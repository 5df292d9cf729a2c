"""What changed since a cursor: the agent's index of job changes, for catch-up reads and heartbeats.

Every change of a job's observable state (what ``GET /jobs/{id}`` answers: status, rc, pid,
started_at, finished_at, reason), and every new job, takes the next number of a sequence. A cursor
names a point of it: ``<epoch>.<number>``, the epoch being random per agent process. Cursors are not
kept across restarts: one of another epoch (an earlier process of this agent, or another agent) says
nothing about this sequence, so it is answered with every job the agent knows and ``full`` true.

The index keeps each job once, at its last change, in the order of those changes: the jobs changed
after a cursor are the tail of that order, found by walking back from its end to the cursor's number.
An answer costs O(changes since the cursor), however many jobs are retained. A job removed by
retention is forgotten and never reported (a full answer no longer lists it).

No I/O here. It lives on the event loop's thread, where every job record is written.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from agent_api.protocol import JobInfo, ProtocolError, validate_cursor

# The cursors this agent gives; a client keeps them as opaque strings (agent_api.protocol.CURSOR_PATTERN).
CURSOR_SHAPE = re.compile(r"(?P<epoch>[0-9a-f]{16})\.(?P<number>0|[1-9][0-9]{0,17})")
PARAMETER = "changed_since"  # how errors name the cursor: the query parameter that carries it


@dataclass(frozen=True)
class Changes:
    """The jobs changed since a cursor, in the order of their last change, and the cursor of now.

    ``full``: the cursor was empty or of another epoch, and ``jobs`` is every job the agent knows.
    """

    jobs: list[JobInfo]
    cursor: str
    full: bool


class ChangeIndex:
    """The last change of every job of this agent, in order, numbered from this process's start."""

    def __init__(self, *, epoch: str | None = None) -> None:
        self.epoch = epoch if epoch is not None else secrets.token_hex(8)
        self._number = 0
        self._last: OrderedDict[str, tuple[int, JobInfo]] = OrderedDict()
        # Set, then replaced, at every change: whoever waits holds the event of its moment.
        self._changed = asyncio.Event()

    @property
    def cursor(self) -> str:
        """The cursor of now: an answer to it names only changes still to come."""
        return f"{self.epoch}.{self._number}"

    def note(self, info: JobInfo) -> None:
        """``info`` is a job's state now. A new job, or a change of what it shows, takes the next
        number; the same state again (the monitor saving descendants, say) changes nothing."""
        last = self._last.get(info.job_id)
        if last is not None and last[1] == info:
            return
        self._number += 1
        self._last[info.job_id] = (self._number, info)
        self._last.move_to_end(info.job_id)
        self._changed.set()
        self._changed = asyncio.Event()

    def forget(self, job_id: str) -> None:
        """The job is gone (retention): no answer lists it from now on."""
        self._last.pop(job_id, None)

    def since(self, cursor: str | None) -> Changes:
        """The jobs changed after ``cursor`` (None or empty: every job, ``full``).

        Raises :class:`ProtocolError` for a cursor this agent cannot have given (see :meth:`position`).
        """
        after = self.position(cursor)
        if after is None:
            return Changes([info for _, info in self._last.values()], self.cursor, full=True)
        changed: list[JobInfo] = []
        for number, info in reversed(self._last.values()):
            if number <= after:
                break
            changed.append(info)
        changed.reverse()
        return Changes(changed, self.cursor, full=False)

    def changed_after(self, cursor: str | None) -> bool:
        """Whether an answer to ``cursor`` may say something now (always, for a full answer)."""
        after = self.position(cursor)
        return after is None or self._number > after

    async def wait(self, cursor: str | None, timeout: float) -> bool:
        """Return as soon as something changed after ``cursor``: True; False once ``timeout`` seconds
        passed without a change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.changed_after(cursor):
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                async with asyncio.timeout(left):
                    await self._changed.wait()
            except TimeoutError:
                return self.changed_after(cursor)
        return True

    def position(self, cursor: str | None) -> int | None:
        """The change ``cursor`` names in this epoch; None for no cursor, or one of another epoch.

        Raises :class:`ProtocolError` naming the problem for anything else: not a cursor's characters
        or length, not this agent's shape, or a number this process has not reached (a cursor it
        never gave: answering it would hide the changes up to that number).
        """
        if not cursor:
            return None
        validate_cursor(cursor, PARAMETER)
        match = CURSOR_SHAPE.fullmatch(cursor)
        if match is None:
            raise ProtocolError(
                f"{PARAMETER} {cursor!r} is not a cursor this agent gives (<epoch>.<number>): pass back "
                "the cursor of an earlier answer, or an empty value for every job"
            )
        if match["epoch"] != self.epoch:
            return None
        number = int(match["number"])
        if number > self._number:
            raise ProtocolError(
                f"{PARAMETER} {cursor!r} is ahead of this agent, whose latest change is {self.cursor!r}: "
                "pass back the cursor of an earlier answer"
            )
        return number
