"""Start services as real processes in their own sessions and stop exactly what was started."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")


def free_port() -> int:
    """A loopback port that was free a moment ago (the small race is acceptable for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ok(
    url: str,
    *,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``proc`` dies meanwhile. ``context``
    verifies an https server (default: the system's CAs)."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if 200 <= response.status < 300:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s: {last_error}")


def start(
    argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )


def stop_tree(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """Terminate ``proc`` and every descendant it spawned, by PID, then reap ``proc``.

    Descendants are collected before the first signal: once the parent dies, orphans are
    re-parented and can no longer be found from it.
    """
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def process_group(pgid: int) -> list[psutil.Process]:
    """Every process in process group ``pgid`` (the agent starts each job as a group leader)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie has ended: it only waits to be reaped)."""

    def running(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [proc for proc in procs if running(proc)]


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 15.0, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it is truthy and return that value; AssertionError naming ``what``
    after ``timeout`` seconds (for tests)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} not within {timeout:g} s"
        time.sleep(interval)
    return value


def wait_until(
    predicate: Callable[[], object], *, timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> float:
    """Poll ``predicate`` until it is truthy and return the seconds that took; ``TimeoutError`` naming
    ``what`` after ``timeout`` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - started
