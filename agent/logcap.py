"""A job's output on disk stays under ``[agent] max_log_bytes``, however much the job writes.

The job writes ``output.log`` itself (its stdout and stderr are the file, opened for appending), so
the agent can neither block nor kill it for its volume, and must not: once the file passes the cap,
the agent punches the middle out of it (``fallocate(FALLOC_FL_PUNCH_HOLE)``): the first half of the
cap and the most recent half stay, the blocks between are given back to the file system, and every
offset stays where it was, so readers paging by offset (the task's log, ``agentic jobs log``) go on.
The range dropped is kept in ``log.dropped``; a read from inside it answers one line saying what was
dropped and continues after it. File systems without hole punching (rare: ext4, xfs, btrfs and tmpfs
all have it) keep the whole output, with one warning.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from agent.jobfiles import write_json_atomic

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096  # holes are punched in whole blocks: a partial one would only be zeroed, not freed
DROPPED_FILE = "log.dropped"

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's fallocate, no lookup
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


@dataclass(frozen=True)
class Dropped:
    """Bytes ``start`` to ``end`` of the output were dropped (they read as zeros)."""

    start: int
    end: int

    def note(self, max_bytes: int) -> bytes:
        return (
            f"[agent: output bytes {self.start}-{self.end} dropped: the job wrote more than "
            f"max_log_bytes={max_bytes}; its first and latest output are kept]\n"
        ).encode()


def next_hole(size: int, max_bytes: int, dropped: Dropped | None) -> Dropped | None:
    """What to punch now so that at most ``max_bytes`` of a ``size``-byte output stay: from the end of
    the head (half the cap, or where the last hole ended) to where the latest half begins, in whole
    blocks; None when nothing needs to go (or less than a block would)."""
    if not max_bytes or size <= max_bytes:
        return None
    head = max(BLOCK, (max_bytes // 2) // BLOCK * BLOCK)
    start = dropped.end if dropped is not None else head
    end = (size - max_bytes // 2) // BLOCK * BLOCK
    return Dropped(start, end) if end - start >= BLOCK else None


def punch(path: Path, hole: Dropped) -> None:
    """Give the blocks of ``hole`` back to the file system; the file's size is unchanged."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, hole.start, hole.end - hole.start):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code) if code else "fallocate failed")
    finally:
        os.close(fd)


def read_dropped(job_dir: Path) -> Dropped | None:
    try:
        value = json.loads((job_dir / DROPPED_FILE).read_text(encoding="utf-8"))
        return Dropped(int(value["start"]), int(value["end"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_dropped(job_dir: Path, dropped: Dropped) -> None:
    write_json_atomic(job_dir / DROPPED_FILE, {"start": dropped.start, "end": dropped.end}, durable=False)


def unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
