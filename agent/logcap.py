"""A job's output on disk stays under ``[agent] max_log_bytes`` at every moment, however fast it writes.

**The design.** The job does not write ``output.log`` itself: its stdout and stderr are one pipe, and
its supervisor (:mod:`agent.supervisor`, the job's parent, which outlives the agent) copies what comes
out of it into ``output.log`` (:class:`CappedLog`). Being the file's writer, the supervisor trims as
it writes: past the cap it punches the middle out of the file (``fallocate(FALLOC_FL_PUNCH_HOLE)``):
the first half of the cap and the most recent half stay, the blocks between go back to the file
system, and every offset stays where it was, so readers paging by offset (the task's log,
``agentic jobs log``, ``GET /jobs/{id}/log``) go on. It punches as soon as the range to drop reaches
:func:`trim_step`, after each read of at most :func:`chunk_bytes` from the pipe: the file never holds
more than the cap plus a step and a chunk (2.6 MiB for a 2 MiB cap, 101.3 MiB for 100 MiB), nor,
once the output pauses or ends, more than the cap and a block. The pipe is the only back-pressure:
the job writes as fast as the supervisor copies: 80-90 % of direct writes' speed for a 300 MiB
flood, faster than them line by line (bench/output_cap.py, bench/RESULTS.md).

The file's hole is the record of what was dropped (``SEEK_HOLE``, ``SEEK_DATA``): nothing is written
beside each punch, nothing goes stale (a ``log.dropped`` written before each punch, to be read
after each read, cost 1 ms a punch: a third of a fast writer's throughput). A read from inside the
hole answers one line saying what was dropped (:meth:`Dropped.note`) and continues after it
(:func:`read_output`). The supervisor punches while the agent reads: the hole is looked at again
after each read, a seek that waits for a punch in progress (ext4 and tmpfs take the inode's lock for
both), so bytes read as they were punched (zeros) are never sent. When the output pauses
(``NOTE_AFTER_IDLE``) or ends and its tail no longer says so, the supervisor adds a line saying that
the middle was dropped.

**What defeats it, and what does not.**

- *The agent SIGKILLed, SIGSTOPped or restarted while the job writes*: nothing changes for the job;
  the agent is not on the output's path while the supervisor lives.
- *The supervisor SIGKILLed* (the OOM killer, an operator; it ignores SIGTERM, SIGINT and SIGHUP):
  the job neither dies of SIGPIPE (its end of the pipe is opened read-write, through
  ``/proc/self/fd``: the pipe always has a reader) nor waits in ``write()`` once the pipe is full
  (``PIPE_BYTES``, 1 MiB): the agent takes the supervisor's place. ``output.pipe`` (:class:`PipeFile`),
  written by the supervisor before it announces the job and removed once the pipe has no writer,
  names the pipe (its inode) and the cap. Within ``poll_seconds`` of the supervisor's death the
  agent's monitor (:mod:`agent.monitor`) opens the pipe for reading through ``/proc/<pid>/fd/<n>`` of
  a process of the job that holds it (:func:`open_pipe`: the shell first, then the descendants
  recorded or seen; the opened end's inode is checked), and a thread copies it into the same
  ``output.log`` under the same cap until its last writer is gone (:func:`copy_until_closed`),
  whether or not the job ended meanwhile: children writing after the shell exited are read until
  they exit. Lost: what the supervisor had read but not written (a chunk at most), and the exit code,
  as before (the job ends ``FAILED``, ``rc`` null, once its shell is gone). A stop or
  ``timeout_seconds`` still ends it. An agent started after the supervisor died, or restarted while
  it read, does the same at its start (a full pipe waits only while no agent runs): it looks in the
  job's record, and in ``output.pipe``, where the agent lists the job's processes once the record no
  longer does. Not found: a process of the job no agent saw (orphaned within one ``poll_seconds`` of
  its start); it waits in ``write()`` once the pipe is full, until it is killed.
- *The supervisor SIGSTOPped*: the job waits in ``write()`` once the pipe is full, until it is
  continued, as behind any pipe.
- *Children that keep writing after the job's shell exited*: they hold the pipe, so their output is
  copied and capped until the last of them exits; the supervisor (their subreaper) waits for them.
  ``exit.json`` is written when the shell is reaped, once what the shell wrote is in the file.
- *stdout and stderr*: one pipe, one open file description, so their order is kept as before.
- *A process outside the job handed the pipe* (``SCM_RIGHTS``): once the job's processes are gone the
  supervisor copies what is there and exits; that process then waits in ``write()`` once it is full
  (``output.pipe`` stays; the agent finds none of the job's processes holding it and removes it).
- *A file system without hole punching* (rare: ext4, xfs, btrfs and tmpfs have it; ramfs and NFSv3
  do not): the supervisor finds out before the job starts and lets the job write ``output.log``
  itself, as before; the whole output is kept, and the agent warns once at its start. So does
  ``max_log_bytes = 0``: no pipe, no cap.
- *A file system that punches holes but cannot seek them* (none of the above): a read from the middle
  gets its zeros instead of the line saying it was dropped; the cap holds.
- *A full disk*: output that cannot be written is dropped (said once in ``supervisor.log``); the job
  never sees the error, nor waits on it.
- *A job started by a supervisor from before this design* and adopted by this agent writes directly,
  uncapped, until it ends.
- The job sees a pipe where it saw a file: a job that seeks on its stdout would notice. Each running
  job holds a pipe of 1 MiB of kernel memory (less past ``fs.pipe-user-pages-soft``, which is slower).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import stat
import sys

from agent.jobfiles import LOG_FILE, write_json_atomic

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the supervisor imports this module (see its start cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096  # holes are punched in whole blocks: a partial one would only be zeroed, not freed
PIPE_FILE = "output.pipe"  # the job's output pipe, while it may still have writers (see PipeFile)
PIPE_BYTES = 1024 * 1024  # the job's pipe, when the kernel allows it (fs.pipe-max-size; else 64 KiB)
NOTE_AFTER_IDLE = 0.2  # seconds without output before the tail is told what was dropped

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's fallocate, no lookup
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Dropped:
    """Bytes ``start`` to ``end`` of the output were dropped (they read as zeros).

    A plain class, not a dataclass: ``dataclasses`` would cost the supervisor's start 5 ms.
    """

    __slots__ = ("end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dropped) and (self.start, self.end) == (other.start, other.end)

    def __hash__(self) -> int:
        return hash((self.start, self.end))

    def __repr__(self) -> str:
        return f"Dropped(start={self.start}, end={self.end})"

    def covers(self, offset: int) -> bool:
        return self.start <= offset < self.end

    def note(self, max_bytes: int) -> bytes:
        return (
            f"[agent: output bytes {self.start}-{self.end} dropped: the job wrote more than "
            f"max_log_bytes={max_bytes}; its first and latest output are kept]\n"
        ).encode()


# ---------------------------------------------------------------------------------- the rule


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


def trim_step(max_bytes: int) -> int:
    """The least range worth a punch while the job writes: a 16th of the cap, a block to 256 KiB."""
    return max(BLOCK, min(256 * 1024, max_bytes // 16))


def chunk_bytes(max_bytes: int) -> int:
    """The most the supervisor reads from the pipe (and writes) before it trims: a quarter of the cap,
    between a block and the pipe's size."""
    return max(BLOCK, min(PIPE_BYTES, max_bytes // 4))


def dropping_line(max_bytes: int, start: int) -> str:
    """The line the output gets once its middle is being dropped."""
    return (
        f"[agent] output past max_log_bytes={max_bytes} is dropped from its middle "
        f"(from byte {start}); the first and the latest output are kept"
    )


# ---------------------------------------------------------------------------------- the file


def _punch_fd(fd: int, offset: int, length: int) -> None:
    """Give the blocks from ``offset`` on back to the file system; the file's size is unchanged."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code) if code else "fallocate failed")


def can_punch_fd(fd: int) -> bool:
    """Whether the file system of ``fd`` punches holes: asked past the file's end, where it drops nothing.
    Raises OSError for anything but "not supported"."""
    past_end = os.fstat(fd).st_size // BLOCK * BLOCK + 2 * BLOCK
    try:
        _punch_fd(fd, past_end, BLOCK)
    except OSError as exc:
        if unsupported(exc):
            return False
        raise
    return True


def can_punch(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` can have holes punched (asked of a scratch file, removed)."""
    path = os.path.join(directory, f".punch-probe.{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        return can_punch_fd(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def dropped_range(fd: int, size: int) -> Dropped | None:
    """The range of the output dropped: the file's hole, if it has one before ``size`` (its only one:
    the middle; a file system that cannot tell holes shows none, and the zeros are read)."""
    try:
        start = os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:  # an empty file (ENXIO), or no SEEK_HOLE here
        return None
    if start >= size:
        return None
    try:
        end = os.lseek(fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            return None
        end = os.fstat(fd).st_size  # a hole to the end of the file: no output after it yet
    return Dropped(start, end)


def read_output(path: str | os.PathLike[str], offset: int, limit: int) -> tuple[bytes, int, Dropped | None]:
    """Up to ``limit`` bytes of the output from ``offset`` and its size; or, for an ``offset`` in the
    range dropped, no bytes and that range. Bytes never come from the range: those read while it was
    punched (zeros) are cut off, as the hole seen after the read says.

    An offset at or past the end is answered from the size alone: a seek past the file system's
    largest file size fails (EINVAL on ext4 beyond 16 TiB). The output only grows, so an offset below
    the size seen here is inside the file when it is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # not started yet: an empty log
        return b"", 0, None
    try:
        size = os.fstat(fd).st_size
        if offset >= size:
            return b"", size, None
        dropped = dropped_range(fd, size)
        if dropped is not None and dropped.covers(offset):
            return b"", size, dropped
        if dropped is not None and offset < dropped.start:
            limit = min(limit, dropped.start - offset)  # up to the hole: its zeros are never sent
        data = os.pread(fd, limit, offset) if limit > 0 else b""
        punched = dropped_range(fd, size)  # waits for a punch in progress
        if punched is not None and punched.covers(offset):
            return b"", size, punched
        if punched is not None and offset < punched.start:
            data = data[: punched.start - offset]
        return data, size, None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- the writer


class CappedLog:
    """``output.log`` as the supervisor writes it (or the agent, once the supervisor is gone): the job's
    output appended, its middle punched out past ``max_bytes``. Never raises once open: what fails is
    said once through ``report`` (by default the supervisor's log, its stderr) and the job's output goes
    on being read, so the job never waits on a failure."""

    def __init__(self, job_dir: str, max_bytes: int, *, report: Callable[[str], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.chunk = chunk_bytes(max_bytes)
        self._step = trim_step(max_bytes)
        self._say = report or _to_stderr
        # O_APPEND: the agent appends lines of its own (a stop); neither overwrites the other.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(os.path.join(job_dir, LOG_FILE), flags, 0o666)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._dropped = dropped_range(self._fd, self._size)
        self._note_at = self._note_in_tail()  # where the last dropping_line starts
        self._reported: set[str] = set()
        self.trimming = False
        try:
            self.trimming = bool(max_bytes) and can_punch_fd(self._fd)
        except OSError as exc:
            self._report("cannot tell whether holes can be punched in the job's output", exc)

    @property
    def note_pending(self) -> bool:
        """Something was dropped since the tail last said so."""
        return self._dropped is not None and (self._note_at is None or self._note_at < self._dropped.end)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._report("cannot write the job's output (dropped)", exc)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)  # with the agent's lines, if any
        self._trim(self._step)

    def settle(self) -> None:
        """The output paused or ended: trim to the block, and say in the tail what was dropped."""
        self._size = os.lseek(self._fd, 0, os.SEEK_END)  # the agent may have added a line since
        self._trim(BLOCK)
        if not self.note_pending or self._dropped is None:
            return
        end = self._size
        try:
            needs_newline = end > 0 and os.pread(self._fd, 1, end - 1) != b"\n"
            line = ("\n" if needs_newline else "") + dropping_line(self.max_bytes, self._dropped.start) + "\n"
            os.write(self._fd, line.encode())
        except OSError as exc:
            self._report("cannot write to the job's output", exc)
            return
        self._note_at = end
        self._size = os.lseek(self._fd, 0, os.SEEK_END)

    def close(self) -> None:
        self.settle()
        os.close(self._fd)

    def _trim(self, least: int) -> None:
        if not self.trimming:
            return
        hole = next_hole(self._size, self.max_bytes, self._dropped)
        if hole is None or hole.end - hole.start < least:
            return
        try:
            _punch_fd(self._fd, hole.start, hole.end - hole.start)
        except OSError as exc:
            if unsupported(exc):
                self.trimming = False
            self._report("cannot drop the middle of the job's output", exc)
            return
        self._dropped = Dropped(self._dropped.start if self._dropped else hole.start, hole.end)

    def _note_in_tail(self) -> int | None:
        """Where the tail says what was dropped, if it ends so: a log taken over (the agent's, after
        the supervisor's) does not say it twice."""
        if self._dropped is None:
            return None
        line = (dropping_line(self.max_bytes, self._dropped.start) + "\n").encode()
        start = self._size - len(line)
        try:
            return start if start >= 0 and os.pread(self._fd, len(line), start) == line else None
        except OSError:
            return None

    def _report(self, what: str, exc: OSError) -> None:
        if what not in self._reported:
            self._reported.add(what)
            self._say(f"{what}: {exc.strerror or exc}")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def copy_available(pipe: int, log: CappedLog | None, buffer: memoryview, limit: int) -> int:
    """Up to ``limit`` bytes that are in the (non-blocking) pipe now, into ``log`` (nowhere if None):
    how many; -1 at the pipe's end (its last writer is gone)."""
    copied = 0
    while copied < limit:
        try:
            count = os.readv(pipe, [buffer])
        except BlockingIOError:
            return copied
        if not count:
            return -1
        if log is not None:
            log.write(buffer[:count])
        copied += count
    return copied


# ---------------------------------------------------------------------------------- the takeover


class PipeFile:
    """What ``output.pipe`` in the job's directory says: the job's output pipe (its inode), the cap
    its supervisor applies, and the job's processes the agent knows of once its record no longer lists
    them (``processes``, ``[pid, start_ticks]`` pairs). The supervisor writes it before the job is
    announced and removes it once the pipe has no writer left; while it exists without a live
    supervisor, the agent is the pipe's reader (:func:`open_pipe`, :func:`copy_until_closed`)."""

    __slots__ = ("inode", "max_bytes", "processes")

    def __init__(self, inode: int, max_bytes: int, processes: list[list[int]] | None = None) -> None:
        self.inode = inode
        self.max_bytes = max_bytes
        self.processes = processes or []

    @classmethod
    def read(cls, job_dir: str | os.PathLike[str]) -> PipeFile | None:
        """None without the file, or with one that does not parse (then nothing can be taken over)."""
        try:
            with open(os.path.join(job_dir, PIPE_FILE), "rb") as file:
                value = json.loads(file.read())
            processes = [[int(pid), int(ticks)] for pid, ticks in value.get("processes", [])]
            return cls(int(value["inode"]), int(value["max_log_bytes"]), processes)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def write(self, job_dir: str | os.PathLike[str]) -> None:
        # Not fsynced: the pipe and the processes it names end with the machine.
        value = {"inode": self.inode, "max_log_bytes": self.max_bytes, "processes": self.processes}
        write_json_atomic(os.path.join(job_dir, PIPE_FILE), value, durable=False)

    @staticmethod
    def remove(job_dir: str | os.PathLike[str]) -> None:
        try:
            os.unlink(os.path.join(job_dir, PIPE_FILE))
        except FileNotFoundError:
            pass


def open_pipe(inode: int, pids: Iterable[int]) -> tuple[int, int] | None:
    """A read end of the pipe ``inode``, non-blocking, opened again through the first of ``pids`` that
    holds it (``/proc/<pid>/fd/<n>``: a new reader of the same pipe; the job's own ends are untouched);
    and that PID. Its stdout and stderr are looked at first. None if none of them holds it now."""
    name = f"pipe:[{inode}]"
    for pid in pids:
        try:
            fds = sorted(os.listdir(f"/proc/{pid}/fd"), key=lambda fd: (fd not in ("1", "2"), int(fd)))
        except (OSError, ValueError):  # gone, or not ours to look at
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path) != name:
                    continue
                pipe = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            found = os.fstat(pipe)
            if stat.S_ISFIFO(found.st_mode) and found.st_ino == inode:  # not another one since
                return pipe, pid
            os.close(pipe)
    return None


def copy_until_closed(pipe: int, log: CappedLog | None, stopping: Callable[[], bool]) -> bool:
    """Copy what comes out of ``pipe`` (non-blocking) into ``log`` until its last writer is gone: True;
    False as soon as ``stopping()`` says so (asked at least every ``NOTE_AFTER_IDLE`` seconds)."""
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    limit = log.chunk if log is not None else PIPE_BYTES
    buffer = memoryview(bytearray(limit))
    while not stopping():
        if not poller.poll(round(NOTE_AFTER_IDLE * 1000)):
            if log is not None and log.note_pending:
                log.settle()
            continue
        if copy_available(pipe, log, buffer, limit) < 0:
            return True
    return False
