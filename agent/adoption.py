"""Adopting jobs after an agent restart: every job directory is read before ``/health`` reports ready.

A job that was running is adopted if its shell (PID + start ticks) or its supervisor is still alive.
If ``exit.json`` exists the job ended while the agent was down, and it gets its final status with the
exact ``rc``. If neither the processes nor ``exit.json`` exist (the supervisor was killed too), the job
is ``FAILED`` with ``rc`` null and a reason that says the exit code is unknown. A stop that was in
progress when the agent died (``stop_reason`` recorded) is handed back to be resumed. Processes the
agent cannot verify are never signalled: a job recorded in an earlier boot (its processes ended with
that boot), or in state format 1 (identities by wall-clock time, see :mod:`agent.state`), ends at once,
with its ``rc`` if ``exit.json`` exists and otherwise ``FAILED`` with a reason that says why nothing
was stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from agent import outcome
from agent.spawn import SUPERVISOR_START_TIMEOUT
from agent.state import JobDir, ShellRecord, StateError, StoredJob
from agent.tracked_job import TrackedJob
from agent_api.protocol import JOB_ID_PATTERN, AgentJobStatus

log = logging.getLogger(__name__)


def stored_jobs(root: Path, *, boot_id: str) -> Iterator[TrackedJob]:
    """The jobs under ``root`` as their ``state.json`` records them; unreadable directories are skipped."""
    for path in sorted(root.iterdir()):
        if not path.is_dir() or JOB_ID_PATTERN.fullmatch(path.name) is None:
            continue
        job_dir = JobDir(path)
        try:
            record = job_dir.read_state()
        except StateError as exc:
            log.warning("skipping job %s: unreadable state: %s", path.name, exc)
            continue
        if record is None:  # the agent died before the first write: nothing was started yet
            record = StoredJob(job_id=path.name, status=AgentJobStatus.QUEUED, boot_id=boot_id)
        elif record.job_id != path.name:
            log.warning("skipping job directory %s: state.json names job %r", path.name, record.job_id)
            continue
        yield TrackedJob(job_dir, record)


async def adopt(job: TrackedJob, *, boot_id: str) -> str | None:
    """Take over a job that was not finished when the previous agent stopped; the caller holds its lock.

    Returns the reason of a stop that was in progress, for the caller to resume; None if there is none
    (or the job has ended meanwhile).
    """
    record = job.record
    unverifiable = outcome.unverifiable(record, boot_id=boot_id)
    if unverifiable is not None:
        job.finish_exited(job.read_exit(), lost=unverifiable)
        return None
    if record.shell is None:  # the agent died while starting it
        announced = await _await_shell(job)
        if announced is None:
            job.finish(AgentJobStatus.FAILED, rc=None, reason="the agent stopped before the job started")
            return None
        job.mark_running(announced)
        record = job.record
    if job.finish_if_exited():
        return None
    shell, supervisor = record.shell, record.supervisor
    if not (shell and shell.alive()) and not (supervisor and supervisor.alive()):
        job.finish_exited(job.read_exit())
        return None
    log.info("adopted job %s: pid %s", record.job_id, record.pid)
    return record.stop_reason


async def _await_shell(job: TrackedJob) -> ShellRecord | None:
    """The shell a supervisor started (or is starting) while no agent waited for its answer."""
    supervisor = job.record.supervisor
    deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
    while True:
        shell = job.read_shell()
        if shell is not None:
            return shell
        if supervisor is None or not supervisor.alive() or time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.05)
