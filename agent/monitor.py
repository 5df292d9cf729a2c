"""Periodic checks of running jobs: exit, descendants, and ``timeout_seconds``.

Every ``poll_seconds`` each running job is checked: whether it exited (its supervisor wrote
``exit.json``, or its shell and supervisor are gone), which descendants it has (recorded with their
start ticks, so that processes that left the process group can still be found at stop time), and
whether its ``timeout_seconds`` ran out, measured on the boot clock from the shell's start so that a
wall-clock step neither fires it early nor delays it. A job whose lock is held is skipped: the start
or stop in progress settles it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from agent import logcap
from agent.process_tree import ProcessRef, ProcessTable
from agent.tracked_job import TrackedJob
from agent_api.protocol import AgentJobStatus

log = logging.getLogger(__name__)


class Monitor:
    """Checks the running jobs among ``jobs`` (a live view of the agent's) every ``poll_seconds``."""

    def __init__(
        self,
        jobs: Mapping[str, TrackedJob],
        *,
        poll_seconds: float,
        reap_supervisors: Callable[[], None],
        stop: Callable[[TrackedJob, str], object],
        max_log_bytes: int = 0,
    ) -> None:
        self._jobs = jobs
        self._max_log_bytes = max_log_bytes
        self._cap_unsupported = False  # warned once: this file system cannot punch holes
        self._poll_seconds = poll_seconds
        self._reap_supervisors = reap_supervisors
        self._stop = stop  # starts a stop without waiting for it; the job's lock is not held then

    async def run(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                log.exception("job monitor tick failed; continuing")
            await asyncio.sleep(self._poll_seconds)

    async def _tick(self) -> None:
        self._reap_supervisors()
        running = [job for job in self._jobs.values() if job.record.status is AgentJobStatus.RUNNING]
        if not running:
            return
        table = await asyncio.to_thread(ProcessTable.scan)
        for job in running:
            if job.lock.locked():
                continue  # a start or stop is in progress and will settle the job itself
            async with job.lock:
                self._check(job, table)

    def _check(self, job: TrackedJob, table: ProcessTable) -> None:
        if job.record.status.finished or job.finish_if_exited():
            return
        record = job.record
        roots = [ref for ref in (record.shell, record.supervisor) if ref is not None]
        if not any(table.alive(ref) for ref in roots):
            job.finish_exited(job.read_exit())
            return
        seen: set[ProcessRef] = set()
        for root in (record.supervisor, record.shell):
            if root is not None:
                seen |= table.descendants(root)  # empty for a root that is gone
        seen -= {record.shell}
        tracked = frozenset({ref for ref in record.descendants if table.alive(ref)} | seen)
        if tracked != record.descendants:
            job.save(replace(record, descendants=tracked), durable=False)
        self._check_timeout(job)
        self._cap_output(job)

    def _cap_output(self, job: TrackedJob) -> None:
        """Keep the job's output under max_log_bytes on disk (agent/logcap.py); never stops the job."""
        if not self._max_log_bytes or self._cap_unsupported:
            return
        try:
            size = job.dir.log_path.stat().st_size
        except FileNotFoundError:
            return
        dropped = job.dropped()
        hole = logcap.next_hole(size, self._max_log_bytes, dropped)
        if hole is None:
            return
        try:
            logcap.punch(job.dir.log_path, hole)
        except OSError as exc:
            if logcap.unsupported(exc):
                self._cap_unsupported = True
                log.warning("max_log_bytes: this file system cannot drop part of a file; outputs stay whole")
            else:
                log.warning("job %s: cannot cap its output: %s", job.record.job_id, exc.strerror or exc)
            return
        merged = logcap.Dropped(dropped.start if dropped else hole.start, hole.end)
        logcap.write_dropped(job.dir.path, merged)
        job.log_dropped = merged
        if dropped is None:
            job.append_log_line(
                f"[agent] output past max_log_bytes={self._max_log_bytes} is dropped from its middle "
                f"(from byte {merged.start}); the first and the latest output are kept"
            )

    def _check_timeout(self, job: TrackedJob) -> None:
        record, shell = job.record, job.record.shell
        if record.timeout_seconds is None or shell is None or job.timeout_fired:
            return
        if shell.running_for() < record.timeout_seconds:  # not now - started_at: the wall clock may step
            return
        job.timeout_fired = True
        self._stop(job, f"timeout: still running after timeout_seconds={record.timeout_seconds:g}")
