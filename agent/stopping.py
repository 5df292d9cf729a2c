"""Stopping one job: record the intent, end its whole process tree, then record how it ended.

The stop reason is saved before the first signal, so an agent that dies half-way resumes the stop when
it restarts (see :mod:`agent.adoption`). The tree is every live process of the job: its shell, the
shell's current descendants, the descendants recorded while it ran (processes that left the group),
and orphans re-parented to the supervisor; :mod:`agent.termination` signals it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import replace
from datetime import UTC, datetime

from agent import outcome
from agent.process_tree import ProcessRef, ProcessTable
from agent.state import ExitRecord
from agent.termination import terminate_tree
from agent.tracked_job import TrackedJob
from agent_api.protocol import AgentJobStatus, StopAction, StopResult

log = logging.getLogger(__name__)

EXIT_FILE_WAIT = 5.0  # after the tree is gone, how long the supervisor may take to write exit.json


async def stop_job(job: TrackedJob, *, force: bool, reason: str, grace: float) -> StopResult:
    """Stop the job's whole process tree (SIGTERM, ``grace``, SIGKILL); answers once it is gone."""
    async with job.lock:
        if job.record.status.finished:
            return outcome.already_finished(job.record)
        if job.finish_if_exited():
            return outcome.already_finished(job.record)
        job.save_or_hold(replace(job.record, stop_reason=reason), "the stop's intent")  # signal all the same
        log.info("stopping job %s (force=%s): %s", job.record.job_id, force, reason)
        ended = await terminate_tree(lambda: _tree(job), pgid=job.record.pgid, grace=grace, force=force)
        if ended.survivors:
            pids = ", ".join(str(ref.pid) for ref in ended.survivors)
            log.error("job %s: processes %s survived SIGKILL", job.record.job_id, pids)
            return StopResult(
                ok=False,
                message=f"processes {pids} are still alive after SIGKILL",
                status=job.record.status,
                rc=None,
                action=StopAction.KILLED,
                signal="SIGKILL",
                reason=reason,
            )
        exit_record = await _await_exit(job)
        if ended.signal is None:
            # nothing was alive when we looked: it ended by itself just before, not by our stop
            job.record = replace(job.record, stop_reason=None)
            job.finish_exited(exit_record)
            return outcome.already_finished(job.record)
        action = StopAction.KILLED if ended.signal is signal.SIGKILL else StopAction.TERMINATED
        rc = exit_record.rc if exit_record else None
        job.finish(
            AgentJobStatus.FAILED,
            rc=rc,
            reason=reason,
            finished_at=exit_record.finished_at if exit_record else None,
        )
        with contextlib.suppress(OSError):  # a full disk keeps the line, not the stop
            await asyncio.to_thread(
                job.append_log_line,
                f"[agentic-agent {datetime.now(UTC).isoformat()}] job stopped: {reason} "
                f"({action.value} with {ended.signal.name}, rc={rc})",
            )
        log.info("job %s %s with %s, rc=%s", job.record.job_id, action.value, ended.signal.name, rc)
        return StopResult(
            ok=True,
            message=f"job {job.record.job_id} {action.value} with {ended.signal.name}",
            status=job.record.status,
            rc=rc,
            action=action,
            signal=ended.signal.name,
            reason=reason,
        )


def _tree(job: TrackedJob) -> set[ProcessRef]:
    """Every live process of the job: shell, current and recorded descendants (not the supervisor)."""
    record = job.record
    table = ProcessTable.scan()
    members = set(record.descendants)
    if record.shell is not None:
        members.add(record.shell)
        members |= table.descendants(record.shell)
    if record.supervisor is not None:
        members |= table.descendants(record.supervisor)  # includes orphans re-parented to the subreaper
        members.discard(record.supervisor)
    return {ref for ref in members if table.alive(ref)}


async def _await_exit(job: TrackedJob) -> ExitRecord | None:
    """The supervisor writes exit.json right after reaping the shell; give it a moment."""
    deadline = time.monotonic() + EXIT_FILE_WAIT
    supervisor = job.record.supervisor
    interval = 0.002
    while True:
        exit_record = job.read_exit()
        if exit_record is not None or time.monotonic() >= deadline:
            return exit_record
        if supervisor is None or not supervisor.alive():
            return job.read_exit()
        await asyncio.sleep(interval)
        interval = min(0.05, interval * 2)
