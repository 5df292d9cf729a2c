"""The agent's jobs: :class:`JobManager` keeps every job of this agent and is the core, free of HTTP.

Each job runs under its own supervisor process (:mod:`agent.supervisor`), which starts
``/bin/sh -c <command>`` in a new session and writes ``exit.json`` when the shell is reaped. The agent
never waits on the job itself; it learns the exit from that file. The same code path therefore serves
jobs this agent started and jobs it adopted after a restart, and both get their exact ``rc``.

The pieces, one module each:

- :mod:`agent.spawn` starts a job: its environment, its supervisor, the handshake with its shell;
- :mod:`agent.adoption` reads the job directories at start and takes over unfinished jobs;
- :mod:`agent.monitor` checks running jobs every ``poll_seconds`` (exit, descendants, timeout), and
  reads a job's output in place of its supervisor should that one be killed;
- :mod:`agent.stopping` stops one job's process tree and records how it ended;
- :mod:`agent.outcome` holds the pure rules that turn an exit or a lost job into a status and reason;
- :mod:`agent.tracked_job` is one job in memory: its directory, record and lock;
- :mod:`agent.admission` says whether a new job may start (``max_jobs``, the drain flag);
- :mod:`agent.fence` says when the agent, cut off from the sidecar, stops its ``at_most_once`` jobs;
- :mod:`agent.changes` numbers every change of a job's state, for catch-up reads and heartbeats.

All mutations of one job (start, stop, finishing) hold that job's asyncio lock, so two stops, or a stop
and a natural exit, never race.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent import adoption, logcap, outcome, procfs
from agent.admission import Admission
from agent.changes import ChangeIndex
from agent.config import AgentConfig
from agent.errors import JobRejected, UnknownJob, UnreadableJob
from agent.fence import Fence, Silence, check_period
from agent.monitor import Monitor
from agent.retention import Budget, Finished, to_remove
from agent.self_check import SelfCheck
from agent.spawn import Spawner
from agent.state import JobDir, StoredJob
from agent.stopping import stop_job
from agent.tracked_job import TrackedJob
from agent_api.protocol import JOB_ID_PATTERN, AgentJobStatus, JobInfo, LogChunk, RunRequest, StopResult

__all__ = ["MAX_LOG_CHUNK", "JobManager", "JobRejected", "UnknownJob"]

log = logging.getLogger(__name__)

MAX_LOG_CHUNK = 4 * 1024 * 1024
DRAIN_CHECK_SECONDS = 1.0  # how late a bounded drain may stop what still runs


@dataclass(frozen=True)
class Retained:
    """Finished jobs kept on disk, and their bytes (``/healthz``)."""

    jobs: int
    bytes: int


class JobManager:
    """All jobs of one agent, in memory and under ``<home>/jobs``."""

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._root = config.home / "jobs"
        self._boot_id = procfs.boot_id()
        self._jobs: dict[str, TrackedJob] = {}
        self._changes = ChangeIndex()
        self._spawner = Spawner(
            secret_envs=frozenset({config.token_env, config.router_token_env}),
            run_as_users=config.run_as_users,
            allow_root_jobs=config.allow_root_jobs,
            max_log_bytes=config.max_log_bytes,
        )
        # Each job's supervisor caps its output as it writes it (agent/logcap.py); the monitor reads
        # that output in its place, into the same capped log, once it is gone.
        self._checks = Monitor(
            self._jobs,
            poll_seconds=config.poll_seconds,
            reap_supervisors=self._spawner.reap,
            stop=self._stop_later,
            boot_id=self._boot_id,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self.admission = Admission(agent_id=config.id, max_jobs=config.max_jobs, home=config.home)
        self.self_check = SelfCheck(
            config.home, min_free_bytes=config.min_free_disk_bytes, changed=self.admission.set_unwell
        )
        # Contact counts from here, the agent's start: adopted jobs are neither fenced at once nor never.
        self.fence = Fence(config.fence_after_seconds)
        self._fencing: set[str] = set()  # jobs whose fence stop is under way
        self._drain_stopping: set[str] = set()  # jobs whose stop at the drain's timeout is under way
        self.retained = Retained(jobs=0, bytes=0)  # as of the last retention check

    # ------------------------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Read every job directory; adopt running jobs, finish those that ended meanwhile."""
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.self_check.check()  # before listening: an unwell agent takes no job from its start
        if self._config.max_log_bytes and not await asyncio.to_thread(logcap.can_punch, self._root):
            log.warning("max_log_bytes: this file system cannot drop part of a file; outputs stay whole")
        self.admission.load()
        for job in adoption.stored_jobs(self._root, boot_id=self._boot_id):
            self._track(job)
            self._checks.watch_output(job)  # finished or not: its processes may still write
            if not job.record.status.finished:
                async with job.lock:
                    interrupted_stop = await adoption.adopt(job, boot_id=self._boot_id)
                    if interrupted_stop is not None:
                        self._stop_later(job, interrupted_stop)
        log.info("loaded %d jobs, %d running", len(self._jobs), self.running_count())

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._checks.run(), name="job-monitor")
        self._tasks.add(asyncio.create_task(self._retain(), name="job-retention"))
        if self.fence.enabled:
            self._tasks.add(asyncio.create_task(self._watch_fence(), name="job-fence"))
        self._tasks.add(asyncio.create_task(self._watch_drain(), name="job-drain-timeout"))
        self._tasks.add(asyncio.create_task(self.self_check.run(), name="self-check"))

    async def close(self) -> None:
        """Stop watching. Running jobs are left alone: they outlive the agent and are adopted later."""
        tasks = [*self._tasks, *([self._monitor] if self._monitor else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._checks.close()
        self._spawner.reap()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every job to end; True if none is left running."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.running_count():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self._config.poll_seconds, left))
        return True

    # ------------------------------------------------------------------------------ queries

    def running_count(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.record.status.finished)

    def get(self, job_id: str) -> JobInfo:
        job = self._job(job_id)
        info = job.record.info()
        self._answered_outcome(job)
        return info

    def _answered_outcome(self, job: TrackedJob) -> None:
        """Someone (the sidecar) was just told how the job ended: retention may remove it in due time."""
        if not job.record.status.finished or self._outcome_read(job):
            return
        try:
            job.dir.read_marker_path.touch()
            job.outcome_read = True
        except OSError as exc:
            log.warning("job %s: cannot mark its outcome as read: %s", job.record.job_id, exc.strerror or exc)

    def _outcome_read(self, job: TrackedJob) -> bool:
        if job.outcome_read is None:
            job.outcome_read = job.dir.read_marker_path.exists()
        return job.outcome_read

    # ------------------------------------------------------------------------------ changes

    def changes_since(
        self, cursor: str | None, *, statuses: frozenset[AgentJobStatus] | None = None
    ) -> tuple[list[JobInfo], str, bool]:
        """The jobs whose state changed after ``cursor``, each as it is now, in the order of their last
        change; the cursor to pass next time; and whether the answer is full.

        ``cursor`` is one an earlier call returned. None or empty, or one of an earlier process of
        this agent (cursors do not outlive a restart), gets every job the agent knows and ``full``
        True: a job not listed then is unknown here. ``statuses``: only the changed jobs now of these
        statuses; the cursor still passes every change. Costs O(changes since ``cursor``).
        Raises :class:`agent_api.protocol.ProtocolError` for a cursor this agent cannot have given.

        Reading marks nothing: whoever delivers the answer calls :meth:`mark_delivered` once it is
        delivered (the heartbeat sender, when the sidecar acknowledges the cursor that came with it).
        """
        changes = self._changes.since(cursor)
        jobs = changes.jobs if statuses is None else [j for j in changes.jobs if j.status in statuses]
        return jobs, changes.cursor, changes.full

    async def wait_for_change(self, cursor: str | None, timeout: float) -> bool:
        """Return as soon as a job changed after ``cursor`` (at once if one did, or for a cursor that
        gets a full answer): True; False once ``timeout`` seconds passed without a change. Raises
        :class:`~agent_api.protocol.ProtocolError` as :meth:`changes_since` does."""
        return await self._changes.wait(cursor, timeout)

    async def mark_delivered(self, jobs: Iterable[JobInfo]) -> None:
        """These jobs' states reached their reader: for the finished ones, as a ``GET /jobs/{id}`` of
        each, retention may remove them once ``retain_finished_seconds`` passed. One file each, the
        first time only; in a thread, as a full answer may hold thousands."""
        known = (self._jobs.get(info.job_id) for info in jobs if info.status.finished)
        unmarked = [job for job in known if job is not None and not job.outcome_read]

        def mark() -> None:
            for job in unmarked:
                self._answered_outcome(job)

        if unmarked:
            await asyncio.to_thread(mark)

    def _track(self, job: TrackedJob) -> None:
        """From now on the agent knows ``job``, and every record it saves is a change to number."""
        job.dir.on_state = lambda record: self._changes.note(record.info())
        self._jobs[job.record.job_id] = job
        self._changes.note(job.record.info())

    # ------------------------------------------------------------------------------ retention

    async def _retain(self) -> None:
        """Every ``retention_check_seconds``: remove the finished jobs :mod:`agent.retention` picks."""
        config = self._config
        budget = Budget(
            keep_seconds=config.retain_finished_seconds,
            unread_seconds=config.retain_unread_seconds,
            max_jobs=config.max_retained_jobs,
            max_bytes=config.max_retained_bytes,
        )
        while True:
            try:
                await self._retain_once(budget)
            except Exception:
                log.exception("retention check failed; continuing")
            await asyncio.sleep(config.retention_check_seconds)

    async def _retain_once(self, budget: Budget) -> None:
        finished = [
            job for job in self._jobs.values() if job.record.status.finished and job.record.finished_at
        ]
        sizes = await asyncio.to_thread(lambda: [job.dir.size() for job in finished])
        self.retained = Retained(jobs=len(finished), bytes=sum(sizes))
        candidates = [
            Finished(job.record.job_id, ended, self._outcome_read(job), size)
            for job, size in zip(finished, sizes, strict=True)
            if (ended := job.record.finished_at) is not None
        ]
        for job_id in to_remove(candidates, budget, now=datetime.now(UTC)):
            job = self._jobs.get(job_id)
            if job is None:
                continue
            async with job.lock:
                if not job.record.status.finished or self._jobs.get(job_id) is not job:
                    continue
                del self._jobs[job_id]
                self._changes.forget(job_id)
            await asyncio.to_thread(shutil.rmtree, job.dir.path, True)
            log.info("job %s removed (retention): ended %s", job_id, job.record.finished_at)

    def list(self, statuses: frozenset[AgentJobStatus] | None = None) -> list[JobInfo]:
        """Every job this agent knows (optionally of some statuses), in job-id order."""
        return [
            job.record.info()
            for job_id, job in sorted(self._jobs.items())
            if statuses is None or job.record.status in statuses
        ]

    async def read_log(
        self, job_id: str, *, offset: int, limit: int | None, cursor: bool = False
    ) -> LogChunk:
        """Up to ``limit`` bytes (at most MAX_LOG_CHUNK) of the job's output from ``offset``.

        ``next_offset`` is where the bytes end: from at or past the end of the log, no bytes and the
        start itself, so a client paging by it waits there for the log to grow.

        ``cursor``: the reader is the task's log, which has shown everything before ``offset``. The job
        keeps that mark (in its directory: it outlives a restart of the agent and of the reader) and the
        bytes start at the later of ``offset`` and the mark, so a trigger started again from its
        deferral's offset goes on where the previous one stopped instead of repeating its output.
        """
        job = self._job(job_id)
        size_limit = MAX_LOG_CHUNK if limit is None else min(limit, MAX_LOG_CHUNK)
        if not cursor:
            return await self._chunk(job, offset, size_limit)
        async with job.log_mark_lock:  # readers of one job (a trigger and its successor) in turn
            if job.log_mark is None:
                job.log_mark = await asyncio.to_thread(job.dir.read_log_mark)
            start = max(offset, job.log_mark)
            chunk = await self._chunk(job, start, size_limit)
            size = chunk.size
            # Never past the log's end: a wrong offset must not hide output still to come.
            mark = min(start, size)
            if mark > job.log_mark:
                job.log_mark = mark
                try:
                    await asyncio.to_thread(job.dir.write_log_mark, mark)
                except OSError as exc:  # a full disk: the read still answers; the mark lives in memory
                    log.warning("job %s: cannot save its log mark: %s", job_id, exc.strerror or exc)
        return chunk

    async def _chunk(self, job: TrackedJob, start: int, limit: int) -> LogChunk:
        """The output from ``start``; the range the cap dropped (agent/logcap.py) reads as one line
        saying so, and the next read continues after it (``next_offset``)."""
        data, size, dropped = await asyncio.to_thread(logcap.read_output, job.dir.log_path, start, limit)
        if dropped is None:
            return LogChunk(data=data, next_offset=start + len(data), size=size)
        note = dropped.note(self._config.max_log_bytes)
        # Only if it fits before the range's end: the answer's bytes must start at or after ``start``.
        fits = len(note) <= min(limit, dropped.end - start)
        return LogChunk(data=note if fits else b"", next_offset=dropped.end, size=size)

    def _job(self, job_id: str) -> TrackedJob:
        job = self._jobs.get(job_id)
        if job is None:
            self._refuse_unreadable(job_id)
            raise UnknownJob(job_id)
        return job

    def _refuse_unreadable(self, job_id: str) -> None:
        """ "Not known" must mean it: the sidecar ends a job its agent denies knowing."""
        if JOB_ID_PATTERN.fullmatch(job_id) and (self._root / job_id).is_dir():
            raise UnreadableJob(job_id)

    # ------------------------------------------------------------------------------ run

    async def run(self, request: RunRequest) -> JobInfo:
        """Start a job; answers once its process runs (or failed to start).

        Refused, with nothing written: bad input (400), a known id (409: said before "full" or
        "draining", so a resent job is not started again elsewhere), a full or draining agent (503).
        """
        job_id = request.job_id
        # A known id first, before the checks of the payload: a resent /run of a job that runs must
        # hear 409 (it runs), never a refusal the sidecar would take for the job's end (a cwd the job
        # removed since, a run_as this agent no longer allows after a restart).
        if job_id in self._jobs or (self._root / job_id).exists():
            raise JobRejected(409, f"job {job_id!r} already exists")
        at_most_once = request.payload.at_most_once or self._config.at_most_once_default
        if at_most_once and not self.fence.enabled:
            raise JobRejected(
                400, "payload.at_most_once: this agent does not fence ([agent] fence_after_seconds = 0)"
            )
        env = await self._spawner.job_env(request.payload)  # validates; raises before anything is written
        if job_id in self._jobs:
            raise JobRejected(409, f"job {job_id!r} already exists")
        # No await from these checks to the job's registration below: concurrent runs see each other,
        # and no fence begins in between.
        self.admission.check(self.running_count())
        if at_most_once and (silence := self.fence.cut_off()) is not None:
            raise JobRejected(503, f"agent {self._config.id} takes no at_most_once job: {silence.reason}")
        path = self._root / job_id
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise JobRejected(409, f"job {job_id!r} already exists") from None
        record = StoredJob(
            job_id,
            AgentJobStatus.QUEUED,
            boot_id=self._boot_id,
            timeout_seconds=request.payload.timeout_seconds,
            at_most_once=at_most_once,
        )
        job = TrackedJob(JobDir(path), record)
        self._track(job)  # before the first await: a concurrent duplicate sees it
        async with job.lock:
            try:
                job.save(job.record)
                await self._spawner.start(job, request.payload, env)
                self._checks.watch_output(job)
            except Exception as exc:
                log.exception("job %s: start failed", job_id)
                job.finish(AgentJobStatus.FAILED, rc=None, reason=f"could not start: {exc}")
            return job.record.info()

    # ------------------------------------------------------------------------------ stop

    async def stop(self, job_id: str, *, force: bool, reason: str) -> StopResult:
        """Stop the job's whole process tree; answers once it is gone. Idempotent.

        A job this agent has never seen gets a tombstone: a FAILED record under its id, so that a
        ``/run`` still on its way (sent before the stop, delayed by the network or a paused agent)
        is refused instead of starting work nobody will ever stop.
        """
        if job_id not in self._jobs:
            return self._tombstone(job_id, reason or "stop requested")
        job = self._job(job_id)
        task = self._background(self._stop(job, force=force, reason=reason or "stop requested"))
        result = await asyncio.shield(task)  # a client that hangs up does not leave a half-done stop
        self._answered_outcome(job)  # the answer says how it ended
        return result

    def _tombstone(self, job_id: str, reason: str) -> StopResult:
        path = self._root / job_id
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # a directory without a loadable state: its process may run
            raise UnreadableJob(job_id) from None
        record = StoredJob(
            job_id,
            AgentJobStatus.FAILED,
            boot_id=self._boot_id,
            reason=f"stopped before it started: {reason}",
            finished_at=datetime.now(UTC),
        )
        job = TrackedJob(JobDir(path), record)
        job.save(record)
        self._track(job)
        self._answered_outcome(job)
        log.info("job %s: stop before any run; its id is now refused", job_id)
        return outcome.already_finished(record)

    # ------------------------------------------------------------------------ drain timeout

    async def _watch_drain(self) -> None:
        """Every second: a drain whose timeout has passed stops what still runs (a bounded drain)."""
        while True:
            await asyncio.sleep(DRAIN_CHECK_SECONDS)
            maintenance = self.admission.maintenance
            if (
                not self.admission.draining
                or maintenance is None
                or not maintenance.timed_out(datetime.now(UTC))
            ):
                continue
            if stopping := self.drain_timed_out(f"stopped: the drain timed out ({maintenance.describe()})"):
                log.warning(
                    "the drain timed out: stopping %d job(s): %s",
                    len(stopping),
                    ", ".join(stopping),
                    extra={"action": "drain_timed_out"},
                )

    def drain_timed_out(self, reason: str) -> tuple[str, ...]:
        """Begin the stop of every unfinished job not being stopped for it already; their ids."""
        due = [
            job
            for job_id, job in self._jobs.items()
            if not job.record.status.finished and job_id not in self._drain_stopping
        ]
        for job in due:
            self._drain_stopping.add(job.record.job_id)
            task = self._stop_later(job, reason)
            task.add_done_callback(functools.partial(self._drain_stopped, job.record.job_id))
        return tuple(job.record.job_id for job in due)

    def _drain_stopped(self, job_id: str, _: asyncio.Task[StopResult]) -> None:
        self._drain_stopping.discard(job_id)  # stopped, or not (survivors): the next check tries again

    # ------------------------------------------------------------------------------ fence

    async def _watch_fence(self) -> None:
        """Every check period: cut off from the sidecar, stop the unfinished at_most_once jobs."""
        period = check_period(self.fence.fence_after)
        announced: float | None = None  # the silence already logged
        while True:
            await asyncio.sleep(period)
            silence = self.fence.cut_off()
            if silence is None:
                continue
            stopping = self.fence_now(silence)
            if stopping and announced != silence.since:
                announced = silence.since
                log.warning(
                    "%s: stopping %d at_most_once jobs: %s",
                    silence.reason,
                    len(stopping),
                    ", ".join(stopping),
                    extra={"action": "fenced"},
                )

    def fence_now(self, silence: Silence) -> tuple[str, ...]:
        """Begin the stop of every unfinished at_most_once job not being fenced already (no await:
        a /run between the check and these stops cannot start one that escapes them); their ids."""
        due = [
            job
            for job_id, job in self._jobs.items()
            if job.record.at_most_once and not job.record.status.finished and job_id not in self._fencing
        ]
        for job in due:
            self._fencing.add(job.record.job_id)
            task = self._stop_later(job, silence.reason)
            task.add_done_callback(functools.partial(self._fenced, job.record.job_id))
        self.fence.carried_out(silence)
        return tuple(job.record.job_id for job in due)

    def _fenced(self, job_id: str, _: asyncio.Task[StopResult]) -> None:
        self._fencing.discard(job_id)  # stopped, or not (survivors): the next check tries again

    def _stop(self, job: TrackedJob, *, force: bool, reason: str) -> Coroutine[Any, Any, StopResult]:
        return stop_job(job, force=force, reason=reason, grace=self._config.grace_seconds)

    def _stop_later(self, job: TrackedJob, reason: str) -> asyncio.Task[StopResult]:
        """A stop that nobody waits for (a timeout, or a stop the previous agent did not finish)."""
        return self._background(self._stop(job, force=False, reason=reason))

    def _background(self, coro: Coroutine[Any, Any, StopResult]) -> asyncio.Task[StopResult]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background job task failed", exc_info=task.exception())
