"""Whether this machine can start a job the way its ``/run`` asks: checked before anything is recorded.

Every problem is a 400 (:class:`~agent.errors.JobRejected`) whose message starts with the field (a
check that gets no answer in time is a 503: see below):

- ``payload.run_as``: the agent does not run as root, no such user, or no process can be started as it;
- ``payload.cwd``: ``cannot be used: <why>``, with the operating system's own words (``File name too
  long``, ``Permission denied``, ``Not a directory``, ``No such file or directory``, ``Too many levels
  of symbolic links``...); with ``run_as``, a directory that user may not enter;
- ``payload.command``, ``payload.env[...]``: longer than ``exec`` takes on this machine.

Why here and not at the start: a refusal records nothing and says why (the sidecar fails the task at
once with this message), while an exception would be a 500, which the sidecar takes for an agent it
could not reach. ``os.stat`` raises on many paths rather than saying no, so its error is the answer.

``run_as``: the job's shell enters ``cwd`` before it becomes the user (``subprocess`` changes the
directory first), so a directory closed to the user would be open to its job. The agent asks
``/bin/sh``, started as that user, to enter it. Checks that touch the file system or the user
database run in threads of their own (:data:`CHECK_THREADS`), bounded by :data:`CHECK_SECONDS`. One
with no answer in time (a hung mount, a user database that does not answer) is a 503 with
``Retry-After``, not a 400: nothing says the job is wrong, only that this machine cannot start it now,
so the sidecar forgets it and routes it elsewhere or has the task retry; a 400 would fail the task for
good. The bound stays well below the sidecar's 10 s wait for ``/run``, whose expiry it would take for an
agent it cannot reach. Hung checks hold only their own threads: the agent's other work never waits.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import grp
import os
import pwd
import stat
import subprocess
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from agent.errors import JobRejected

__all__ = [
    "CHECK_SECONDS",
    "PRIVILEGED_GROUPS",
    "check_cwd",
    "check_deadline",
    "exec_limits",
    "exec_size_problem",
    "find_user",
    "root_job_problem",
    "run_as_problem",
    "shown",
    "user_groups",
]

CHECK_SECONDS = 5.0  # all of one /run's checks, at most: then 503, below the sidecar's 10 s for /run
CHECK_THREADS = 4  # hung checks wait here: a full pool answers the next check 503 in CHECK_SECONDS
RETRY_AFTER_SECONDS = 30
_checks = ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="run-check")
POINTER_BYTES = 8  # exec counts one pointer per argument and variable besides their bytes
_T = TypeVar("_T")


def shown(value: str, limit: int = 80) -> str:
    """``value`` quoted for a message, shortened: an answer need not echo a whole request."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


# Groups whose members are root in all but name (sudo rights, the docker or lxd socket, raw disks):
# "*" in run_as_users does not cover their members, nor an account whose primary group is gid 0.
PRIVILEGED_GROUPS = frozenset({"root", "sudo", "wheel", "admin", "docker", "lxd", "disk"})


async def user_groups(user: pwd.struct_passwd, *, deadline: float) -> frozenset[str]:
    """The names of the groups ``user`` is in (its primary group and the others)."""
    return await _bounded(
        functools.partial(_groups, user),
        deadline,
        "payload.run_as: cannot be checked now: the group database gave no answer within "
        f"{CHECK_SECONDS:g} s",
    )


def _groups(user: pwd.struct_passwd) -> frozenset[str]:
    names = set()
    for gid in os.getgrouplist(user.pw_name, user.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.add(str(gid))
    return frozenset(names)


def run_as_problem(user: pwd.struct_passwd, groups: Collection[str], allowed: Collection[str]) -> str | None:
    """Why a job may not run as ``user`` (in ``groups``) under ``[agent] run_as_users`` (None: it
    may). A name listed is allowed; "*" allows anyone else but root and root's equivalents."""
    if user.pw_name in allowed:
        return None
    if user.pw_uid == 0 or user.pw_gid == 0:
        return (
            f"payload.run_as: {shown(user.pw_name)} has uid or primary group 0, which [agent] "
            "run_as_users allows only by its name"
        )
    if "*" in allowed and (privileged := sorted(PRIVILEGED_GROUPS & set(groups))):
        return (
            f"payload.run_as: {shown(user.pw_name)} is in group {privileged[0]!r} (as good as root), which "
            "[agent] run_as_users allows only by its name"
        )
    if "*" in allowed:
        return None
    return f"payload.run_as: {shown(user.pw_name)} is not in [agent] run_as_users"


def root_job_problem(allow_root_jobs: bool) -> str | None:
    """Why a job without ``run_as`` may not run here (None: it may): it would run as root."""
    if os.geteuid() != 0 or allow_root_jobs:
        return None
    return (
        "payload.run_as: required: this agent runs as root, and a job without run_as would run as root "
        "([agent] allow_root_jobs = false)"
    )


def check_deadline() -> float:
    """When the checks of one ``/run`` must have answered (monotonic): one bound for all of them."""
    return time.monotonic() + CHECK_SECONDS


async def find_user(name: str, *, deadline: float) -> pwd.struct_passwd:
    """The account ``run_as`` names; 400 if the agent cannot switch users or there is no such user."""
    if (uid := os.geteuid()) != 0:
        raise JobRejected(400, f"payload.run_as needs the agent to run as root; it runs as uid {uid}")
    try:
        return await _bounded(
            functools.partial(pwd.getpwnam, name),
            deadline,
            f"payload.run_as: cannot be checked now: the user database gave no answer within "
            f"{CHECK_SECONDS:g} s",
        )
    except KeyError:
        raise JobRejected(400, f"payload.run_as: no such user {shown(name)}") from None


async def check_cwd(path: str, user: pwd.struct_passwd | None, *, deadline: float) -> None:
    """400 unless ``path`` is a directory the job's user (``user``, else the agent's) may enter."""
    problem = await _bounded(
        functools.partial(cwd_problem, path, user, deadline),
        deadline,
        f"payload.cwd: cannot be checked now: its file system gave no answer within {CHECK_SECONDS:g} s "
        f"({shown(path)})",
    )
    if problem is not None:
        raise JobRejected(400, f"payload.cwd: cannot be used: {problem} ({shown(path)})")


def cwd_problem(path: str, user: pwd.struct_passwd | None, deadline: float) -> str | None:
    """Why a job cannot start in ``path``, or None. Blocking: the file system, maybe a process."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    except ValueError:  # not encodable as a file name
        return "not a file name this machine can use"
    if not stat.S_ISDIR(mode):
        return os.strerror(errno.ENOTDIR)
    if user is None or user.pw_uid == os.geteuid():
        return None if os.access(path, os.X_OK) else os.strerror(errno.EACCES)
    return _enter_as(path, user, deadline)


def _enter_as(path: str, user: pwd.struct_passwd, deadline: float) -> str | None:
    """Whether ``user`` may enter ``path``, asked of a shell running as that user: its permissions,
    ACLs and security modules decide, as they will for the job."""
    try:
        probe = subprocess.run(
            ["/bin/sh", "-c", 'cd -P -- "$1"', "sh", path],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
            cwd="/",
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=max(0.1, deadline - time.monotonic()),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _no_answer(
            f"payload.cwd: cannot be checked now: run_as user {user.pw_name!r} could not enter it within "
            f"{CHECK_SECONDS:g} s ({shown(path)})"
        ) from None
    except OSError as exc:  # no process may run as this user (exec refused, a limit reached)
        why = exc.strerror or type(exc).__name__
        raise JobRejected(400, f"payload.run_as: cannot start a process as {user.pw_name!r}: {why}") from None
    if probe.returncode != 0:
        return f"{os.strerror(errno.EACCES)} for run_as user {user.pw_name!r}"
    return None


def exec_size_problem(
    command: str, env: Mapping[str, str], *, payload_env: Mapping[str, str], arg_strlen: int, arg_max: int
) -> str | None:
    """Why ``exec`` would refuse the job's shell (E2BIG), or None: Linux takes one argument or
    ``NAME=value`` of at most ``arg_strlen`` bytes (with its NUL), and all of them together, with a
    pointer each, up to ``arg_max``. ``env`` is the whole environment, ``payload_env`` the caller's."""
    if len(command.encode()) + 1 > arg_strlen:
        return f"payload.command: longer than the {arg_strlen - 1} bytes exec takes for one argument"
    for key, value in payload_env.items():
        if len(f"{key}={value}".encode()) + 1 > arg_strlen:
            return (
                f"payload.env[{shown(key)}]: longer than the {arg_strlen - 1} bytes exec takes "
                "for one NAME=value"
            )
    strings = ["/bin/sh", "-c", command, *(f"{key}={value}" for key, value in env.items())]
    total = sum(len(text.encode()) + 1 + POINTER_BYTES for text in strings)
    if total > arg_max:
        return (
            f"payload.command and payload.env: {total} bytes for exec together, more than the "
            f"{arg_max} this machine takes"
        )
    return None


def exec_limits() -> tuple[int, int]:
    """This machine's ``(arg_strlen, arg_max)``: Linux's MAX_ARG_STRLEN is 32 pages."""
    return 32 * os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_ARG_MAX")


async def _bounded(work: Callable[[], _T], deadline: float, message: str) -> _T:
    """``work`` in a check thread, or a 503 once ``deadline`` has passed (it may go on hanging in its
    thread; the request does not wait for it)."""
    running = asyncio.get_running_loop().run_in_executor(_checks, work)
    running.add_done_callback(lambda done: done.cancelled() or done.exception())  # read when left behind
    try:
        return await asyncio.wait_for(asyncio.shield(running), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise _no_answer(message) from None


def _no_answer(message: str) -> JobRejected:
    return JobRejected(503, message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
