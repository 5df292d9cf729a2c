"""Finding and signalling the processes of one job, safely against PID reuse.

A PID alone is never trusted: every process is remembered as a :class:`ProcessRef` (PID plus psutil
create time) and is signalled only while a process with that PID *and* that create time exists. A
PID that was freed and handed to an unrelated process therefore is never signalled.

Signalling a whole tree (SIGTERM, grace, SIGKILL) is :mod:`agent.termination`.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import psutil

# A create time is a whole number of clock ticks since boot (1/100 s on Linux), so two different
# processes differ by at least one tick; half a tick absorbs float noise and never merges two of them.
_CREATE_TIME_TOLERANCE = 0.5 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, order=True)
class ProcessRef:
    """A process identified by PID and create time."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        """The current process with ``pid``, or None if there is none."""
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def process(self) -> psutil.Process | None:
        """A psutil handle on this very process, or None if it is gone (or the PID was reused)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > _CREATE_TIME_TOLERANCE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def alive(self) -> bool:
        """Exists and has not exited (a zombie has exited; it only waits to be reaped)."""
        proc = self.process()
        if proc is None:
            return False
        try:
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def send(self, sig: signal.Signals) -> bool:
        """Signal this process if it still is the one we know; True if a signal was delivered.

        The PID is pinned with a pidfd *before* the create time is checked, and the signal goes through
        that pidfd: if the process dies and its PID is reused after the check, the signal reaches
        nobody (``ESRCH``) instead of the newcomer. Without pidfds (Linux < 5.3) psutil's check right
        before ``kill()`` leaves a window of microseconds.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        except OSError:  # no pidfd support: fall back to check-then-kill
            return self._send_without_pidfd(sig)
        try:
            if self.process() is None:
                return False
            signal.pidfd_send_signal(pidfd, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False
        finally:
            os.close(pidfd)

    def _send_without_pidfd(self, sig: signal.Signals) -> bool:
        proc = self.process()
        if proc is None:
            return False
        try:
            proc.send_signal(sig)  # psutil re-checks the create time right before kill()
            return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def to_json(self) -> list[float]:
        return [self.pid, self.create_time]

    @classmethod
    def from_json(cls, value: object) -> ProcessRef:
        if (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], int)
            and not isinstance(value[0], bool)
            and isinstance(value[1], int | float)
        ):
            return cls(value[0], float(value[1]))
        raise ValueError(f"not a [pid, create_time] pair: {value!r}")


def descendants(root: ProcessRef) -> set[ProcessRef]:
    """Every live descendant of ``root`` (not ``root`` itself); empty if ``root`` is gone."""
    proc = root.process()
    if proc is None:
        return set()
    found: set[ProcessRef] = set()
    try:
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.add(ProcessRef(child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            continue
    return found


class ProcessTable:
    """One scan of all processes (parent, create time, zombie or not), shared by all jobs of a tick.

    Walking the table once per tick instead of calling ``children(recursive=True)`` per job keeps the
    monitoring cost at one pass over /proc however many jobs run.
    """

    def __init__(self, rows: dict[int, tuple[int, float, bool]]) -> None:
        self._rows = rows  # pid -> (ppid, create_time, zombie)
        self._children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in rows.items():
            self._children.setdefault(ppid, []).append(pid)

    @classmethod
    def scan(cls) -> ProcessTable:
        rows: dict[int, tuple[int, float, bool]] = {}
        for proc in psutil.process_iter(["ppid", "create_time", "status"]):
            info = proc.info
            if info["ppid"] is None or info["create_time"] is None:
                continue
            rows[proc.pid] = (info["ppid"], info["create_time"], info["status"] == psutil.STATUS_ZOMBIE)
        return cls(rows)

    def alive(self, ref: ProcessRef) -> bool:
        row = self._rows.get(ref.pid)
        return row is not None and abs(row[1] - ref.create_time) <= _CREATE_TIME_TOLERANCE and not row[2]

    def descendants(self, root: ProcessRef) -> set[ProcessRef]:
        if not self.alive(root):
            return set()
        found: set[ProcessRef] = set()
        stack = list(self._children.get(root.pid, ()))
        while stack:
            pid = stack.pop()
            _, create_time, zombie = self._rows[pid]
            if not zombie:
                found.add(ProcessRef(pid, create_time))
            stack.extend(self._children.get(pid, ()))
        return found
