"""The per-job supervisor: a small process between the agent and the job that records the exit code.

``python -m agent.supervisor <job_dir>`` reads the job spec (JSON: command, cwd, env, run_as,
max_log_bytes) from stdin, starts ``/bin/sh -c <command>`` in a new session (its own session and
process group) with stdout and stderr going to ``<job_dir>/output.log`` (through a pipe the supervisor
copies into the file, capped as it writes, when ``max_log_bytes`` is set: see :mod:`agent.logcap`),
and then:

1. writes ``<job_dir>/leader.json`` (``{"pid", "start_ticks", "started_at"}`` of the shell: its identity,
   see :mod:`agent.procfs`, and the wall-clock time for people) atomically and prints the same JSON
   as one line on stdout, which the agent waits for (``{"error": ...}`` if the start failed);
2. waits for the shell and writes ``<job_dir>/exit.json`` (``{"rc", "finished_at"}``) atomically the
   moment it is reaped (once what the shell wrote is in ``output.log``). ``rc`` is what
   :mod:`subprocess` reports: the exit code, or ``-N`` when the shell was killed by signal ``N``.

Why a separate process: the agent may crash or be restarted while jobs keep running. A process that
is not your child cannot be waited for, so an agent that adopts a job after a restart could never
learn its exit code. The supervisor is the job's real parent and outlives the agent (it runs in its
own session), so ``exit.json`` is written whether or not an agent is up.

The supervisor also makes itself a *child subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``): processes of
the job whose parent exits (double fork, ``setsid`` plus exit of the middle process) are re-parented to
the supervisor instead of init, so they remain findable as its descendants when the job is stopped,
and the supervisor reaps them (no zombies). It exits once the shell and every such orphan are gone,
and with them the last writer of the job's pipe.

SIGTERM, SIGINT and SIGHUP sent to the supervisor itself are ignored (a no-op handler, so the job does
not inherit the disposition): stopping happens through the agent, which signals the job's processes;
killing the supervisor loses the exit code, and the agent reads the job's output in its place
(``output.pipe`` names the pipe; :mod:`agent.logcap` says how).

Start cost: one supervisor starts per job, so it imports the standard library only (no psutil, nothing
of the agent but :mod:`agent.jobfiles`, :mod:`agent.logcap` and :mod:`agent.procfs`) and the agent runs
it with ``python -S`` (no ``site``: no ``.pth`` files, no editable-install finders). Keep it that way;
``python -X importtime -S -m agent.supervisor`` shows what an import costs.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import pwd
import select
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

from agent.jobfiles import EXIT_FILE, LOG_FILE, SHELL_FILE, write_json_atomic
from agent.logcap import NOTE_AFTER_IDLE, PIPE_BYTES, CappedLog, PipeFile, copy_available
from agent.procfs import read_stat

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~2 ms; mypy knows this idiom
if TYPE_CHECKING:
    from typing import Any

_PR_SET_CHILD_SUBREAPER = 36
# After a read of less than this, wait a moment for more: a job writing line by line would otherwise
# wake the supervisor once a line (bench/output_cap.py, bench/RESULTS.md).
COALESCE_BELOW = 64 * 1024
COALESCE_SECONDS = 0.002


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agent.supervisor <job_dir>  (job spec JSON on stdin)", file=sys.stderr)
        return 2
    job_dir = argv[0]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _ignore)
    _become_subreaper()
    try:
        spec = json.loads(sys.stdin.buffer.read())
        started_at = datetime.now(UTC).isoformat()
        output = _Output.open(job_dir, int(spec.get("max_log_bytes") or 0))
        try:
            shell = _start(spec, output.job_end)
        finally:
            os.close(output.job_end)  # the job's alone now: the pipe ends when the job's last process does
    except Exception as exc:
        _report({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    stat = read_stat(shell.pid)  # our unreaped child: the PID cannot have been reused
    if stat is None:  # only if /proc is unreadable; an unidentifiable job must not run on
        shell.kill()
        shell.wait()
        _report({"error": f"cannot read /proc/{shell.pid}/stat of the job's shell"})
        return 1
    output.record(job_dir)
    announcement = {"pid": shell.pid, "start_ticks": stat.start_ticks, "started_at": started_at}
    write_json_atomic(os.path.join(job_dir, SHELL_FILE), announcement)
    _report(announcement)
    if output.pipe is None or output.log is None:
        rc = _reap_until_no_children(shell.pid, job_dir)
    else:
        rc = _copy_and_reap(shell.pid, job_dir, output)
    shell.returncode = rc  # we reaped it ourselves; keep Popen from warning about a live child
    return 0


class _Output:
    """Where the job's stdout and stderr go: ``job_end``, the write end of a pipe whose read end
    (``pipe``, of ``pipe_bytes``) the supervisor copies into ``log``; or ``output.log`` itself when
    there is no cap, or its file system cannot punch holes (``pipe`` and ``log`` None)."""

    def __init__(self, job_end: int, pipe: int | None, pipe_bytes: int, log: CappedLog | None) -> None:
        self.job_end = job_end
        self.pipe = pipe
        self.pipe_bytes = pipe_bytes
        self.log = log

    @classmethod
    def open(cls, job_dir: str, max_log_bytes: int) -> _Output:
        if max_log_bytes > 0:
            log = CappedLog(job_dir, max_log_bytes)
            if log.trimming:
                return cls._pipe(log)
            log.close()
            print("max_log_bytes: no hole punching here: the job writes output.log whole", file=sys.stderr)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return cls(os.open(os.path.join(job_dir, LOG_FILE), flags, 0o666), None, 0, None)

    @classmethod
    def _pipe(cls, log: CappedLog) -> _Output:
        """The job's end is the pipe opened again, read-write (through /proc): a pipe with a reader of
        the job's own never kills the job with SIGPIPE, should the supervisor be killed."""
        read_end, write_end = os.pipe()
        try:
            try:
                pipe_bytes = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # past fs.pipe-max-size or the user's pipe pages: the default size does
                pipe_bytes = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
            job_end = os.open(f"/proc/self/fd/{write_end}", os.O_RDWR | os.O_CLOEXEC)
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        return cls(job_end, read_end, pipe_bytes, log)

    def record(self, job_dir: str) -> None:
        """Say which pipe is the job's (``output.pipe``), for the agent to read it should we be killed."""
        if self.pipe is None or self.log is None:
            return
        try:
            PipeFile(os.fstat(self.pipe).st_ino, self.log.max_bytes).write(job_dir)
        except OSError as exc:  # a full disk: the job runs, only a takeover of its output is lost
            print(f"cannot record the job's output pipe: {exc.strerror or exc}", file=sys.stderr)


def _start(spec: dict[str, Any], output: int) -> subprocess.Popen[bytes]:
    run_as = spec.get("run_as")
    identity: dict[str, Any] = {}
    if run_as is not None:
        user = pwd.getpwnam(run_as)
        identity = {
            "user": user.pw_uid,
            "group": user.pw_gid,
            "extra_groups": os.getgrouplist(run_as, user.pw_gid),
        }
    return subprocess.Popen(
        ["/bin/sh", "-c", spec["command"]],
        cwd=spec.get("cwd"),
        env=spec["env"],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **identity,
    )


def _reap_until_no_children(shell_pid: int, job_dir: str, rc: int | None = None) -> int | None:
    """Reap every child (the shell and adopted orphans); write exit.json when the shell is reaped."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return rc
        if pid == shell_pid:
            rc = _record_exit(status, job_dir)


def _copy_and_reap(shell_pid: int, job_dir: str, output: _Output) -> int | None:
    """Copy the job's output from its pipe into its log until the pipe ends (the job's last process
    is gone), reaping every child as it ends; then reap any child left. Returns the shell's rc.

    One thread: ``poll`` waits for output and for SIGCHLD (through the wakeup fd). It reads at most a
    pipe's worth before it looks for ended children again, so a job that never stops writing still
    gets its ``exit.json`` on time; after a small read it waits ``COALESCE_SECONDS`` for more.
    """
    assert output.pipe is not None and output.log is not None
    pipe, log, rc = output.pipe, output.log, None
    children_ended = _child_wakeup()
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    poller.register(children_ended, select.POLLIN)
    buffer = memoryview(bytearray(log.chunk))
    closed, children = False, True
    while not closed:
        ended, children = _reap_ended()
        for pid, status in ended:
            if pid == shell_pid:
                copy_available(pipe, log, buffer, output.pipe_bytes)  # all the shell wrote, before exit.json
                log.settle()
                rc = _record_exit(status, job_dir)
        if not children:
            closed = _copy_rest(pipe, log, buffer)  # what the last of them wrote
            break
        events = poller.poll(round(NOTE_AFTER_IDLE * 1000) if log.note_pending else None)
        if not events:
            log.settle()
        for fd, _ in events:
            if fd == children_ended:
                _drain(children_ended)
            else:
                copied = copy_available(pipe, log, buffer, output.pipe_bytes)
                if copied < 0:
                    closed = True
                elif copied < COALESCE_BELOW:
                    time.sleep(COALESCE_SECONDS)
    log.close()
    if closed:
        PipeFile.remove(job_dir)  # no writer left: nothing for the agent to take over
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return _reap_until_no_children(shell_pid, job_dir, rc) if children else rc


def _copy_rest(pipe: int, log: CappedLog, buffer: memoryview) -> bool:
    """What is left in the pipe, into the log: True if no writer is left (one outside the job may be)."""
    while True:
        copied = copy_available(pipe, log, buffer, PIPE_BYTES)
        if copied < PIPE_BYTES:
            return copied < 0


def _reap_ended() -> tuple[list[tuple[int, int]], bool]:
    """The children that ended (PID, wait status), without waiting; and whether any is left."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended, False
        if not pid:
            return ended, True
        ended.append((pid, status))


def _record_exit(status: int, job_dir: str) -> int:
    rc = os.waitstatus_to_exitcode(status)
    finished_at = datetime.now(UTC).isoformat()
    write_json_atomic(os.path.join(job_dir, EXIT_FILE), {"rc": rc, "finished_at": finished_at})
    return rc


def _child_wakeup() -> int:
    """A file descriptor that turns readable when a child ends: SIGCHLD, through Python's wakeup fd
    (written only for a signal with a Python handler, hence :func:`_child_ended`)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _child_ended)
    return read_end


def _child_ended(signum: int, frame: object) -> None:
    pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _report(message: dict[str, Any]) -> None:
    """One JSON line to the agent, then detach stdout so a gone agent can never cause SIGPIPE."""
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except OSError:
        pass  # the agent is gone; leader.json still tells a restarted agent
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            print(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    except (OSError, AttributeError) as exc:
        print(f"cannot become a child subreaper: {exc}", file=sys.stderr)


def _ignore(signum: int, frame: object) -> None:
    print(f"{datetime.now(UTC).isoformat()} supervisor ignored signal {signum}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
