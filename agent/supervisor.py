"""The per-job supervisor: a small process between the agent and the job that records the exit code.

``python -m agent.supervisor <job_dir>`` reads the job spec (JSON: command, cwd, env, run_as) from
stdin, starts ``/bin/sh -c <command>`` in a new session (its own session and process group) with
stdout and stderr appended to ``<job_dir>/output.log``, and then:

1. writes ``<job_dir>/leader.json`` (``{"pid", "start_ticks", "started_at"}`` of the shell: its identity,
   see :mod:`agent.procfs`, and the wall-clock time for people) atomically and prints the same JSON
   as one line on stdout, which the agent waits for (``{"error": ...}`` if the start failed);
2. waits for the shell and writes ``<job_dir>/exit.json`` (``{"rc", "finished_at"}``) atomically the
   moment it is reaped. ``rc`` is what :mod:`subprocess` reports: the exit code, or ``-N`` when the
   shell was killed by signal ``N``.

Why a separate process: the agent may crash or be restarted while jobs keep running. A process that
is not your child cannot be waited for, so an agent that adopts a job after a restart could never
learn its exit code. The supervisor is the job's real parent and outlives the agent (it runs in its
own session), so ``exit.json`` is written whether or not an agent is up.

The supervisor also makes itself a *child subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``): processes of
the job whose parent exits (double fork, ``setsid`` plus exit of the middle process) are re-parented to
the supervisor instead of init, so they remain findable as its descendants when the job is stopped,
and the supervisor reaps them (no zombies). It exits once the shell and every such orphan are gone.

SIGTERM, SIGINT and SIGHUP sent to the supervisor itself are ignored (a no-op handler, so the job does
not inherit the disposition): stopping happens through the agent, which signals the job's processes;
killing the supervisor only loses the exit code.

Start cost: one supervisor starts per job, so it imports the standard library only (no psutil, nothing
of the agent but :mod:`agent.jobfiles` and :mod:`agent.procfs`) and the agent runs it with
``python -S`` (no ``site``: no ``.pth`` files, no editable-install finders). Keep it that way;
``python -X importtime -S -m agent.supervisor`` shows what an import costs.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import signal
import subprocess
import sys
from datetime import UTC, datetime

from agent.jobfiles import EXIT_FILE, LOG_FILE, SHELL_FILE, write_json_atomic
from agent.procfs import read_stat

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~2 ms; mypy knows this idiom
if TYPE_CHECKING:
    from typing import Any

_PR_SET_CHILD_SUBREAPER = 36


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
        shell = _start(spec, job_dir)
    except Exception as exc:
        _report({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    stat = read_stat(shell.pid)  # our unreaped child: the PID cannot have been reused
    if stat is None:  # only if /proc is unreadable; an unidentifiable job must not run on
        shell.kill()
        shell.wait()
        _report({"error": f"cannot read /proc/{shell.pid}/stat of the job's shell"})
        return 1
    announcement = {"pid": shell.pid, "start_ticks": stat.start_ticks, "started_at": started_at}
    write_json_atomic(os.path.join(job_dir, SHELL_FILE), announcement)
    _report(announcement)
    rc = _reap_until_no_children(shell.pid, job_dir)
    shell.returncode = rc  # we reaped it ourselves; keep Popen from warning about a live child
    return 0


def _start(spec: dict[str, Any], job_dir: str) -> subprocess.Popen[bytes]:
    run_as = spec.get("run_as")
    identity: dict[str, Any] = {}
    if run_as is not None:
        user = pwd.getpwnam(run_as)
        identity = {
            "user": user.pw_uid,
            "group": user.pw_gid,
            "extra_groups": os.getgrouplist(run_as, user.pw_gid),
        }
    with open(os.path.join(job_dir, LOG_FILE), "ab") as log:
        return subprocess.Popen(
            ["/bin/sh", "-c", spec["command"]],
            cwd=spec.get("cwd"),
            env=spec["env"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **identity,
        )


def _reap_until_no_children(shell_pid: int, job_dir: str) -> int | None:
    """Reap every child (the shell and adopted orphans); write exit.json when the shell is reaped."""
    rc: int | None = None
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return rc
        if pid == shell_pid:
            rc = os.waitstatus_to_exitcode(status)
            finished_at = datetime.now(UTC).isoformat()
            write_json_atomic(os.path.join(job_dir, EXIT_FILE), {"rc": rc, "finished_at": finished_at})


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
