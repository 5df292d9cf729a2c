"""Periodic checks of running jobs: exit, descendants, and ``timeout_seconds``.

Every ``poll_seconds`` each running job is checked: whether it exited (its supervisor wrote
``exit.json``, or its shell and supervisor are gone), which descendants it has (recorded with their
start ticks, so that processes that left the process group can still be found at stop time), and
whether its ``timeout_seconds`` ran out, measured on the boot clock from the shell's start so that a
wall-clock step neither fires it early nor delays it. A job whose lock is held is skipped: the start
or stop in progress settles it.

It also gives a job's output a reader when its supervisor is gone. The supervisor copies the job's
output from a pipe into ``output.log`` (:mod:`agent.logcap`); killed (SIGKILL, the OOM killer), it
leaves the pipe to the job alone, and a job that writes more than the pipe holds would wait in
``write()`` forever. So for every job whose ``output.pipe`` names a pipe that may still have writers,
once no supervisor of it is alive, the monitor opens that pipe again through ``/proc/<pid>/fd`` of a
process of the job that holds it and a thread copies it into the same capped ``output.log`` until its
last writer is gone (:class:`_WatchedOutput`). A restarted agent does the same for the jobs it loads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace

from agent import logcap
from agent.process_tree import ProcessRef, ProcessTable
from agent.tracked_job import TrackedJob
from agent_api.protocol import AgentJobStatus

log = logging.getLogger(__name__)


class _WatchedOutput:
    """One job's output pipe, while it may have writers (its ``output.pipe`` exists).

    ``known`` is every live process of the job the agent has seen, any of which may hold the pipe: its
    record stops listing them when it finishes, and a restarted agent finds them in ``output.pipe``
    (``saved``: what that file lists). ``copier``: the thread that reads the pipe, once the
    supervisor is gone; ``ended``: it saw the pipe's end, or no process of the job holding it.
    """

    def __init__(self, job: TrackedJob, pipe: logcap.PipeFile) -> None:
        self.job = job
        self.pipe = pipe
        self.saved = frozenset(ProcessRef(pid, ticks) for pid, ticks in pipe.processes)
        record = job.record
        self.known = self.saved | record.descendants | ({record.shell} if record.shell else set())
        self.copier: threading.Thread | None = None
        self.ended = False


class Monitor:
    """Checks the running jobs among ``jobs`` (a live view of the agent's) every ``poll_seconds``, and
    reads the output of jobs whose supervisor is gone (:meth:`watch_output`)."""

    def __init__(
        self,
        jobs: Mapping[str, TrackedJob],
        *,
        poll_seconds: float,
        reap_supervisors: Callable[[], None],
        stop: Callable[[TrackedJob, str], object],
        boot_id: str,
    ) -> None:
        self._jobs = jobs
        self._poll_seconds = poll_seconds
        self._reap_supervisors = reap_supervisors
        self._stop = stop  # starts a stop without waiting for it; the job's lock is not held then
        self._boot_id = boot_id
        self._outputs: dict[str, _WatchedOutput] = {}  # by job id: the pipes that may still have writers
        self._closing = threading.Event()  # tells the copiers to let go: the agent stops

    async def run(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                log.exception("job monitor tick failed; continuing")
            await asyncio.sleep(self._poll_seconds)

    async def close(self) -> None:
        """Stop reading outputs: ``output.pipe`` stays, and the next agent reads them again."""
        self._closing.set()
        for output in self._outputs.values():
            if output.copier is not None:
                await asyncio.to_thread(output.copier.join, 5)

    def watch_output(self, job: TrackedJob) -> None:
        """From now on ``job``'s output gets a reader whenever its supervisor is gone. Called once its
        supervisor announced it, or, at the agent's start, before adoption may finish it (its record
        lists its processes until then)."""
        pipe = logcap.PipeFile.read(job.dir.path)
        if pipe is None:
            return  # no pipe: no cap, or the pipe ended
        if job.record.boot_id != self._boot_id:  # the pipe ended with that boot
            logcap.PipeFile.remove(job.dir.path)
            return
        self._outputs[job.record.job_id] = _WatchedOutput(job, pipe)

    async def _tick(self) -> None:
        self._reap_supervisors()
        running = [job for job in self._jobs.values() if job.record.status is AgentJobStatus.RUNNING]
        if not running and not self._outputs:
            return
        table = await asyncio.to_thread(ProcessTable.scan)
        self._check_outputs(table)  # first: a check below may finish a job, and its record forgets
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

    # ------------------------------------------------------------------------------ outputs

    def _check_outputs(self, table: ProcessTable) -> None:
        for job_id, output in list(self._outputs.items()):
            try:
                self._check_output(job_id, output, table)
            except Exception:  # one job's output must not keep the others, nor the checks, from running
                log.exception("job %s: checking its output failed; again at the next tick", job_id)

    def _check_output(self, job_id: str, output: _WatchedOutput, table: ProcessTable) -> None:
        job = output.job
        if output.copier is not None and not output.copier.is_alive():
            output.copier = None
            if output.ended:
                logcap.PipeFile.remove(job.dir.path)
                del self._outputs[job_id]
                return
            # else it failed (logged): read again, as no one else will
        supervisor = job.record.supervisor
        supervised = supervisor is not None and table.alive(supervisor)
        if supervised and not job.record.status.finished:
            return  # the supervisor reads the pipe; the job's record lists its processes
        output.known = _live_processes(output, table)
        if supervised or output.copier is not None:
            self._save_processes(output)
        elif not (job.dir.path / logcap.PIPE_FILE).exists():
            del self._outputs[job_id]  # its supervisor saw the pipe end, and exited
        else:
            self._take_over(output)

    def _take_over(self, output: _WatchedOutput) -> None:
        """The supervisor is gone and the pipe may have writers: a thread reads it from now on."""
        self._save_processes(output)  # before the thread: a restarted agent looks for them there
        shell = output.job.record.shell
        pids = [ref.pid for ref in sorted(output.known, key=lambda ref: (ref != shell, ref))]
        output.copier = threading.Thread(
            target=self._copy, args=(output, pids), name=f"output-{output.job.record.job_id}", daemon=True
        )
        output.copier.start()

    def _copy(self, output: _WatchedOutput, pids: list[int]) -> None:
        """In the copier's thread: open the pipe through a process of the job that holds it, and copy
        it into the job's capped log until its last writer is gone (or the agent stops)."""
        job_id, job_dir = output.job.record.job_id, str(output.job.dir.path)
        try:
            found = logcap.open_pipe(output.pipe.inode, pids)
            if found is None:  # no process of the job holds it: no one is left to write
                output.ended = True
                return
            pipe, holder = found
            log.warning("job %s: its supervisor is gone; the agent reads its output (pid %d)", job_id, holder)
            capped = _open_log(job_id, job_dir, output.pipe.max_bytes)
            try:
                output.ended = logcap.copy_until_closed(pipe, capped, self._closing.is_set)
            finally:
                if capped is not None:
                    capped.close()
                os.close(pipe)
            if output.ended:
                log.info("job %s: its output ended (its last process that held it is gone)", job_id)
        except Exception:
            log.exception("job %s: reading its output failed; trying again", job_id)

    def _save_processes(self, output: _WatchedOutput) -> None:
        """Keep ``output.pipe``'s list of the job's processes current (only changes are written; never
        once the supervisor removed it, at the pipe's end)."""
        if output.known == output.saved or not (output.job.dir.path / logcap.PIPE_FILE).exists():
            return
        output.pipe.processes = [ref.to_json() for ref in sorted(output.known)]
        try:
            output.pipe.write(output.job.dir.path)
        except OSError as exc:
            job_id = output.job.record.job_id
            log.warning("job %s: cannot save its processes: %s", job_id, exc.strerror or exc)
            return
        output.saved = output.known

    def _check_timeout(self, job: TrackedJob) -> None:
        record, shell = job.record, job.record.shell
        if record.timeout_seconds is None or shell is None or job.timeout_fired:
            return
        if shell.running_for() < record.timeout_seconds:  # not now - started_at: the wall clock may step
            return
        job.timeout_fired = True
        self._stop(job, f"timeout: still running after timeout_seconds={record.timeout_seconds:g}")


def _live_processes(output: _WatchedOutput, table: ProcessTable) -> frozenset[ProcessRef]:
    """The job's processes alive now that the agent knows of: those seen before, its shell and recorded
    descendants, its supervisor's descendants (orphans it adopted), and the descendants of all these."""
    record = output.job.record
    roots = set(output.known) | record.descendants | ({record.shell} if record.shell else set())
    if record.supervisor is not None:
        roots |= table.descendants(record.supervisor)
    alive = {ref for ref in roots if table.alive(ref)}
    for ref in list(alive):
        alive |= table.descendants(ref)
    return frozenset(alive)


def _open_log(job_id: str, job_dir: str, max_bytes: int) -> logcap.CappedLog | None:
    """The job's capped log, for the agent to write; None if it cannot be opened: its output is then
    read and dropped, for the job must never wait on its log."""

    def report(what: str) -> None:
        log.warning("job %s: %s", job_id, what)

    try:
        return logcap.CappedLog(job_dir, max_bytes, report=report)
    except OSError as exc:
        log.warning("job %s: cannot open its output; dropped from now on: %s", job_id, exc.strerror or exc)
        return None
