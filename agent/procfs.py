"""What the kernel says about processes, read straight from ``/proc``: cheap, and blind to the wall clock.

A process is identified by its PID and its **start ticks**: field 22 (``starttime``) of
``/proc/<pid>/stat``, the clock ticks from boot to the moment the process was created. The kernel
fixes it at fork and it never changes. A wall-clock create time (psutil's ``create_time()``, which is
``btime`` from ``/proc/stat`` plus the start ticks) does change: the kernel derives ``btime`` from the
current wall clock, so an NTP step or a hypervisor time sync moves the create time of every process,
and a process recorded before the step no longer matches itself after it.

Start ticks count on the boot clock (``CLOCK_BOOTTIME``), which a clock step does not move either;
:func:`boot_clock` reads it, to tell how long a process has been running. They restart at zero on
every boot, so records that outlive a reboot also keep :func:`boot_id`.

Standard library only, and ``os`` and ``time`` at that: the per-job supervisor imports this module
(see :mod:`agent.supervisor` on start cost).
"""

from __future__ import annotations

import os
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_EXITED_STATES = (b"Z", b"X", b"x")  # zombie (exited, not yet reaped) and dead


class ProcStat:
    """The fields of one ``/proc/<pid>/stat`` line that the agent uses."""

    __slots__ = ("exited", "pid", "ppid", "start_ticks")

    def __init__(self, pid: int, ppid: int, start_ticks: int, exited: bool) -> None:
        self.pid = pid
        self.ppid = ppid
        self.start_ticks = start_ticks
        self.exited = exited

    def __repr__(self) -> str:
        fields = f"pid={self.pid}, ppid={self.ppid}, start_ticks={self.start_ticks}, exited={self.exited}"
        return f"ProcStat({fields})"


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed, or None if there is no such process (or it cannot be read).

    A process that cannot be read cannot be verified, and callers treat it as gone: never signalled.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return _parse(pid, stat.read())
    except (OSError, ValueError, IndexError):  # gone (ENOENT, or ESRCH mid-read), hidden, or empty
        return None


def _parse(pid: int, line: bytes) -> ProcStat:
    # Field 2 is the command name in parentheses, unescaped: it may hold spaces and ")" itself, so the
    # fixed fields are counted from the last ")". After it come field 3 (state), 4 (ppid), ... 22.
    fields = line[line.rindex(b")") + 2 :].split()
    return ProcStat(pid, int(fields[1]), int(fields[19]), fields[0] in _EXITED_STATES)


def scan() -> dict[int, ProcStat]:
    """Every process of the system by PID: one pass over ``/proc``."""
    table: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                table[stat.pid] = stat
    return table


def boot_id() -> str:
    """A random id the kernel draws at every boot: start ticks compare only within one boot."""
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as source:
        return source.read().strip()


def boot_clock() -> float:
    """Seconds since boot, on the clock that start ticks count (suspend included, steps ignored)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
