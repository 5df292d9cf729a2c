"""Finding and signalling the processes of one job, safely against PID reuse and clock steps.

A PID alone is never trusted: every process is remembered as a :class:`ProcessRef` (PID plus start
ticks since boot, see :mod:`agent.procfs`) and is signalled only while a process with that PID *and*
those start ticks exists. A PID that was freed and handed to an unrelated process therefore is never
signalled, and a process recorded before the wall clock was stepped is still recognised after it.

Signalling a whole tree (SIGTERM, grace, SIGKILL) is :mod:`agent.termination`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from agent import procfs


@dataclass(frozen=True, order=True)
class ProcessRef:
    """A process identified by PID and start ticks since boot."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        """The current process with ``pid``, or None if there is none."""
        stat = procfs.read_stat(pid)
        return cls(pid, stat.start_ticks) if stat is not None else None

    def _stat(self) -> procfs.ProcStat | None:
        stat = procfs.read_stat(self.pid)
        return stat if stat is not None and stat.start_ticks == self.start_ticks else None

    def exists(self) -> bool:
        """This very process is there, if only as a zombie (the PID was not reused)."""
        return self._stat() is not None

    def alive(self) -> bool:
        """Exists and has not exited (a zombie has exited; it only waits to be reaped)."""
        stat = self._stat()
        return stat is not None and not stat.exited

    def running_for(self) -> float:
        """Seconds since this process started, on the boot clock: a wall-clock step does not change it."""
        return procfs.boot_clock() - self.start_ticks / procfs.CLOCK_TICKS

    def send(self, sig: signal.Signals) -> bool:
        """Signal this process if it still is the one we know; True if a signal was delivered.

        The PID is pinned with a pidfd *before* the start ticks are checked, and the signal goes through
        that pidfd: if the process dies and its PID is reused after the check, the signal reaches
        nobody (``ESRCH``) instead of the newcomer. Without pidfds (Linux < 5.3) the check right
        before ``kill()`` leaves a window of microseconds.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        except OSError:  # no pidfd support: fall back to check-then-kill
            return self._send_without_pidfd(sig)
        try:
            if not self.exists():
                return False
            signal.pidfd_send_signal(pidfd, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False
        finally:
            os.close(pidfd)

    def _send_without_pidfd(self, sig: signal.Signals) -> bool:
        if not self.exists():
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def to_json(self) -> list[int]:
        return [self.pid, self.start_ticks]

    @classmethod
    def from_json(cls, value: object) -> ProcessRef:
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
        ):
            return cls(value[0], value[1])
        raise ValueError(f"not a [pid, start_ticks] pair of integers: {value!r}")


class ProcessTable:
    """One scan of all processes (parent, start ticks, exited or not), shared by all jobs of a tick.

    Walking the table once instead of reading each job's children separately keeps the monitoring cost
    at one pass over /proc however many jobs run.
    """

    def __init__(self, stats: Mapping[int, procfs.ProcStat]) -> None:
        self._stats = stats
        self._children: dict[int, list[procfs.ProcStat]] = {}
        for stat in stats.values():
            self._children.setdefault(stat.ppid, []).append(stat)

    @classmethod
    def scan(cls) -> ProcessTable:
        return cls(procfs.scan())

    def alive(self, ref: ProcessRef) -> bool:
        stat = self._stats.get(ref.pid)
        return stat is not None and stat.start_ticks == ref.start_ticks and not stat.exited

    def descendants(self, root: ProcessRef) -> set[ProcessRef]:
        """Every live descendant of ``root`` (not ``root`` itself); empty if ``root`` is gone."""
        if not self.alive(root):
            return set()
        found: set[ProcessRef] = set()
        visited = {root.pid}
        stack = [self._stats[root.pid]]
        while stack:
            parent = stack.pop()
            for child in self._children.get(parent.pid, ()):
                # A parent (or the subreaper that adopted an orphan) started no later than its child.
                # The scan is not atomic: a child that started before the process now listed under its
                # parent's PID was the child of an earlier holder of that PID, and is not followed.
                if child.start_ticks < parent.start_ticks or child.pid in visited:
                    continue
                visited.add(child.pid)
                if not child.exited:
                    found.add(ProcessRef(child.pid, child.start_ticks))
                stack.append(child)
        return found
