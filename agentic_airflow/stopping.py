"""SIGTERM while a task waits on the sidecar: the task ends at once and its log says why.

Airflow stops a running task with SIGTERM (a person marks it failed or clears it, a worker shuts down),
and so do people on call. Airflow 3's task runner (``_run_task_and_map_outcome`` in
``airflow/sdk/execution_time/task_runner.py``) handles it by calling the operator's ``on_kill`` and
returning: nothing interrupts the task, so a ``time.sleep`` or a socket read simply resumes (PEP 475),
and its supervisor escalates to SIGKILL 5 s later (no escalation at all when a person sent the signal).
Airflow 2 (``TaskInstance._execute_task_with_callbacks``) raises ``AirflowTaskTerminated`` from
wherever the task happens to be.

:class:`StopOnSigterm` puts a handler of its own in front of Airflow's for the length of a wait: a
SIGTERM during a sleep or a request to the sidecar (:meth:`StopOnSigterm.interruptible`) logs the
reason, runs Airflow's handler (``on_kill``; on Airflow 2 its raise) and raises at once. One that comes
while Airflow itself is at work (reading the connection, writing an XCom) is held until that returns
(:meth:`StopOnSigterm.check`), so no request of Airflow's is cut in half.

Only in the main thread (the only one Python delivers signals to) and only in front of a handler
written in Python (Airflow's): SIGTERM's default already ends a process at once, and one ignored stays
ignored. No Airflow import: what to raise is handed in.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, Protocol


class Log(Protocol):
    def error(self, msg: str, *args: Any) -> Any: ...


class TaskStopped(BaseException):
    """A wait ended by SIGTERM (what :class:`StopOnSigterm` raises unless told otherwise). A
    ``BaseException``, as Airflow's own ``AirflowTaskTerminated``: no ``except Exception`` retries it."""


Handler = Callable[[int, FrameType | None], Any]


class StopOnSigterm:
    """While entered, SIGTERM ends the wait: at once inside :meth:`interruptible`, else at the next
    :meth:`check` or on leaving. ``describe()`` says why, at that moment (logged, and the text of the
    ``terminated`` exception raised)."""

    def __init__(
        self,
        describe: Callable[[], str],
        *,
        log: Log,
        terminated: Callable[[str], BaseException] = TaskStopped,
    ) -> None:
        self._describe = describe
        self._log = log
        self._terminated = terminated
        self._previous: Handler | None = None  # Airflow's handler, while ours stands in front of it
        self._received: tuple[int, FrameType | None] | None = None
        self._interruptible = 0
        self._stopped = False
        self._handler: Handler = self._on_sigterm  # one bound method: what getsignal() gives back

    @property
    def active(self) -> bool:
        return self._previous is not None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to stand in front of here
        previous = signal.getsignal(signal.SIGTERM)
        if callable(previous):
            self._previous = previous
            signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        previous, self._previous = self._previous, None
        if previous is not None and signal.getsignal(signal.SIGTERM) is self._handler:
            signal.signal(signal.SIGTERM, previous)
        if self._received is not None and not self._stopped:
            self._stop(previous)  # a SIGTERM held back till now: the task ends all the same

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait that SIGTERM ends at once: a sleep, a request to the sidecar."""
        self._interruptible += 1  # before the check: a signal between the two is acted on at once
        try:
            self.check()
            yield
        finally:
            self._interruptible -= 1

    def check(self) -> None:
        """Act on a SIGTERM held back (it came while Airflow was at work)."""
        if self._received is not None and not self._stopped:
            self._stop(self._previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._stopped:
            return  # the task is ending already
        self._received = (signum, frame)
        if self._interruptible:
            self._stop(self._previous)

    def _stop(self, previous: Handler | None) -> None:
        self._stopped = True
        signum, frame = self._received or (signal.SIGTERM, None)
        self._received = None
        reason = self._describe()
        self._log.error("%s", reason)
        if previous is not None:
            previous(signum, frame)  # Airflow's: the operator's on_kill; Airflow 2 raises from it
        raise self._terminated(reason)
