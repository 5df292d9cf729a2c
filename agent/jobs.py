"""Starting, watching, stopping and adopting jobs: the agent's core, free of HTTP.

Each job runs under its own supervisor process (:mod:`agent.supervisor`), which starts
``/bin/sh -c <command>`` in a new session and writes ``exit.json`` when the shell is reaped. The agent
never waits on the job itself; it learns the exit from that file. The same code path therefore serves
jobs this agent started and jobs it adopted after a restart, and both get their exact ``rc``.

A monitor task checks every running job every ``poll_seconds``: exit, descendants (recorded with their
start ticks so that processes that left the process group can still be found at stop time), and
``timeout_seconds`` (measured on the boot clock from the leader's start, so a wall-clock step neither
fires it early nor delays it). All mutations of one job (start, stop, finishing) hold that job's
asyncio lock, so two stops, or a stop and a natural exit, never race.

Adopted jobs and rc: when the agent starts, it reads every ``state.json``. A job that was running is
adopted if its leader (PID + start ticks) or its supervisor is still alive. If ``exit.json`` exists the
job ended while the agent was down, and it gets its final status with the exact ``rc``. If neither
the processes nor ``exit.json`` exist (the supervisor was killed too), the job is ``FAILED`` with
``rc`` null and a reason that says the exit code is unknown. A stop that was in progress when the agent
died (``stop_reason`` recorded) is resumed. Processes the agent cannot verify are never signalled: a
job recorded in an earlier boot (its processes ended with that boot), or in state format 1 (identities
by wall-clock time, see :mod:`agent.state`), ends at once, with its ``rc`` if ``exit.json`` exists and
otherwise ``FAILED`` with a reason that says why nothing was stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import select
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import agent
from agent import procfs
from agent.config import ENV_PREFIX, AgentConfig
from agent.process_tree import ProcessRef, ProcessTable
from agent.state import STATE_FORMAT, ExitRecord, JobDir, JobRecord, LeaderRecord, StateError
from agent.termination import terminate_tree
from agent_api.protocol import (
    JOB_ID_PATTERN,
    JobInfo,
    JobStatus,
    LogChunk,
    RunPayload,
    RunRequest,
    StopAction,
    StopResult,
)

log = logging.getLogger(__name__)

MAX_LOG_CHUNK = 4 * 1024 * 1024
SUPERVISOR_START_TIMEOUT = 30.0  # a Python interpreter starting on a loaded VM
EXIT_FILE_WAIT = 5.0  # after the tree is gone, how long the supervisor may take to write exit.json


class JobRejected(Exception):
    """The request cannot be carried out; nothing was changed. ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UnknownJob(JobRejected):
    def __init__(self, job_id: str) -> None:
        super().__init__(404, f"job {job_id!r} is not known to this agent")


@dataclass(eq=False)
class _Job:
    dir: JobDir
    record: JobRecord
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timeout_fired: bool = False

    def save(self, record: JobRecord, *, durable: bool = True) -> None:
        self.dir.write_state(record, durable=durable)
        self.record = record


def _now() -> datetime:
    return datetime.now(UTC)


class JobManager:
    """All jobs of one agent, in memory and under ``<home>/jobs``."""

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._root = config.home / "jobs"
        self._boot_id = procfs.boot_id()
        self._jobs: dict[str, _Job] = {}
        self._supervisors: list[subprocess.Popen[bytes]] = []  # ours to reap
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Read every job directory; adopt running jobs, finish those that ended meanwhile."""
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in sorted(self._root.iterdir()):
            if not path.is_dir() or JOB_ID_PATTERN.fullmatch(path.name) is None:
                continue
            job_dir = JobDir(path)
            try:
                record = job_dir.read_state()
            except StateError as exc:
                log.warning("skipping job %s: unreadable state: %s", path.name, exc)
                continue
            if record is None:  # the agent died before the first write: nothing was started yet
                record = JobRecord(job_id=path.name, status=JobStatus.QUEUED, boot_id=self._boot_id)
            elif record.job_id != path.name:
                log.warning("skipping job directory %s: state.json names job %r", path.name, record.job_id)
                continue
            job = _Job(job_dir, record)
            self._jobs[record.job_id] = job
            if not record.status.finished:
                async with job.lock:
                    await self._adopt(job)
        log.info("loaded %d jobs, %d running", len(self._jobs), self.running_count())

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._monitor_loop(), name="job-monitor")

    async def close(self) -> None:
        """Stop watching. Running jobs are left alone: they outlive the agent and are adopted later."""
        tasks = [*self._tasks, *([self._monitor] if self._monitor else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in self._supervisors:
            proc.poll()

    # ------------------------------------------------------------------------------ queries

    def running_count(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.record.status.finished)

    def get(self, job_id: str) -> JobInfo:
        return self._job(job_id).record.info()

    def list(self, statuses: frozenset[JobStatus] | None = None) -> list[JobInfo]:
        """Every job this agent knows (optionally of some statuses), in job-id order."""
        return [
            job.record.info()
            for job_id, job in sorted(self._jobs.items())
            if statuses is None or job.record.status in statuses
        ]

    async def read_log(self, job_id: str, *, offset: int, limit: int | None) -> LogChunk:
        """Up to ``limit`` bytes (at most MAX_LOG_CHUNK) of the job's output from ``offset``.

        ``next_offset`` is ``offset`` plus the bytes read: from at or past the end of the log, no bytes
        and ``offset`` itself, so a client paging by it waits there for the log to grow.
        """
        job = self._job(job_id)
        size_limit = MAX_LOG_CHUNK if limit is None else min(limit, MAX_LOG_CHUNK)
        data, size = await asyncio.to_thread(_read_log_chunk, job.dir, offset, size_limit)
        return LogChunk(data=data, next_offset=offset + len(data), size=size)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    # ------------------------------------------------------------------------------ run

    async def run(self, request: RunRequest) -> JobInfo:
        """Start a job; answers once its process runs (or failed to start)."""
        env = self._job_env(request.payload)  # validates; raises before anything is written
        job_id = request.job_id
        if job_id in self._jobs:
            raise JobRejected(409, f"job {job_id!r} already exists")
        path = self._root / job_id
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise JobRejected(409, f"job {job_id!r} already exists") from None
        record = JobRecord(
            job_id, JobStatus.QUEUED, boot_id=self._boot_id, timeout_seconds=request.payload.timeout_seconds
        )
        job = _Job(JobDir(path), record)
        self._jobs[job_id] = job  # before the first await: a concurrent duplicate sees it
        async with job.lock:
            try:
                job.save(job.record)
                await self._start(job, request.payload, env)
            except Exception as exc:
                log.exception("job %s: start failed", job_id)
                self._finish(job, JobStatus.FAILED, rc=None, reason=f"could not start: {exc}")
            return job.record.info()

    def _job_env(self, payload: RunPayload) -> dict[str, str]:
        """Check ``cwd`` and ``run_as`` against this machine, then build the job's environment."""
        if payload.cwd is not None and not Path(payload.cwd).is_dir():
            raise JobRejected(400, f"payload.cwd: {payload.cwd} is not an existing directory")
        env = self._inherited_env()
        if payload.run_as is not None:
            if os.geteuid() != 0:
                raise JobRejected(
                    400, f"payload.run_as needs the agent to run as root; it runs as uid {os.geteuid()}"
                )
            try:
                user = pwd.getpwnam(payload.run_as)
            except KeyError:
                raise JobRejected(400, f"payload.run_as: no such user {payload.run_as!r}") from None
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        env.update(payload.env or {})
        return env

    async def _start(self, job: _Job, payload: RunPayload, env: Mapping[str, str]) -> None:
        cwd = payload.cwd or _default_cwd(payload.run_as, env)
        spec = {"command": payload.command, "cwd": cwd, "env": dict(env), "run_as": payload.run_as}
        try:
            proc = await asyncio.to_thread(self._spawn_supervisor, job.dir)
        except OSError as exc:
            self._finish(job, JobStatus.FAILED, rc=None, reason=f"could not start the supervisor: {exc}")
            return
        self._supervisors.append(proc)
        supervisor = ProcessRef.of(proc.pid)
        job.save(replace(job.record, supervisor=supervisor))
        try:
            answer = await asyncio.to_thread(_handshake, proc, json.dumps(spec).encode())
        except (OSError, TimeoutError, ValueError) as exc:
            answer = f"no answer from the supervisor: {exc}"
        if isinstance(answer, str):
            leader = _read_leader(job)  # a late answer may still have started it
            if leader is None:
                with contextlib.suppress(OSError):
                    proc.kill()  # our own child, and it started nothing
                self._finish(job, JobStatus.FAILED, rc=None, reason=f"could not start: {answer}")
                log.warning("job %s could not start: %s", job.record.job_id, answer)
                return
        else:
            leader = answer
        self._mark_running(job, leader)
        log.info("job %s started: pid %d", job.record.job_id, leader.ref.pid)

    def _mark_running(self, job: _Job, leader: LeaderRecord) -> None:
        job.save(
            replace(
                job.record,
                status=JobStatus.RUNNING,
                pid=leader.ref.pid,
                pgid=leader.ref.pid,  # start_new_session: the shell leads its own session and group
                start_ticks=leader.ref.start_ticks,
                started_at=leader.started_at,
            )
        )

    def _inherited_env(self) -> dict[str, str]:
        """The agent's environment without its own settings and token: jobs must not see the token."""
        return {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(ENV_PREFIX) and key != self._config.token_env
        }

    def _spawn_supervisor(self, job_dir: JobDir) -> subprocess.Popen[bytes]:
        package_root = str(Path(agent.__file__).resolve().parent.parent)
        env = self._inherited_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with job_dir.supervisor_log_path.open("ab") as errors:
            return subprocess.Popen(
                # -S: no site (its .pth files and import finders cost more than the supervisor itself);
                # -P: nothing from the working directory shadows the agent's modules
                [sys.executable, "-S", "-P", "-m", "agent.supervisor", str(job_dir.path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                cwd=job_dir.path,
                env=env,
                start_new_session=True,  # survives the agent and signals sent to the agent's group
            )

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
        return await asyncio.shield(task)  # a client that hangs up does not leave a half-done stop

    def _tombstone(self, job_id: str, reason: str) -> StopResult:
        path = self._root / job_id
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # a directory without a loadable state: leave it, refuse the id
            pass
        record = JobRecord(
            job_id,
            JobStatus.FAILED,
            boot_id=self._boot_id,
            reason=f"stopped before it started: {reason}",
            finished_at=_now(),
        )
        job = _Job(JobDir(path), record)
        job.save(record)
        self._jobs[job_id] = job
        log.info("job %s: stop before any run; its id is now refused", job_id)
        return _already_finished(record)

    async def _stop(self, job: _Job, *, force: bool, reason: str) -> StopResult:
        async with job.lock:
            if job.record.status.finished:
                return _already_finished(job.record)
            if self._finish_if_exited(job):
                return _already_finished(job.record)
            job.save(replace(job.record, stop_reason=reason))
            log.info("stopping job %s (force=%s): %s", job.record.job_id, force, reason)
            outcome = await terminate_tree(
                lambda: self._tree(job),
                pgid=job.record.pgid,
                grace=self._config.grace_seconds,
                force=force,
            )
            if outcome.survivors:
                pids = ", ".join(str(ref.pid) for ref in outcome.survivors)
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
            exit_record = await self._await_exit(job)
            if outcome.signal is None:
                # nothing was alive when we looked: it ended by itself just before, not by our stop
                job.record = replace(job.record, stop_reason=None)
                self._finish_exited(job, exit_record)
                return _already_finished(job.record)
            action = StopAction.KILLED if outcome.signal is signal.SIGKILL else StopAction.TERMINATED
            rc = exit_record.rc if exit_record else None
            self._finish(
                job,
                JobStatus.FAILED,
                rc=rc,
                reason=reason,
                finished_at=exit_record.finished_at if exit_record else None,
            )
            await asyncio.to_thread(
                _append_log_line,
                job.dir,
                f"[agentic-agent {_now().isoformat()}] job stopped: {reason} "
                f"({action.value} with {outcome.signal.name}, rc={rc})",
            )
            log.info("job %s %s with %s, rc=%s", job.record.job_id, action.value, outcome.signal.name, rc)
            return StopResult(
                ok=True,
                message=f"job {job.record.job_id} {action.value} with {outcome.signal.name}",
                status=job.record.status,
                rc=rc,
                action=action,
                signal=outcome.signal.name,
                reason=reason,
            )

    def _tree(self, job: _Job) -> set[ProcessRef]:
        """Every live process of the job: leader, current and recorded descendants (not the supervisor)."""
        record = job.record
        table = ProcessTable.scan()
        members = set(record.descendants)
        if record.leader is not None:
            members.add(record.leader)
            members |= table.descendants(record.leader)
        if record.supervisor is not None:
            members |= table.descendants(record.supervisor)  # includes orphans re-parented to the subreaper
            members.discard(record.supervisor)
        return {ref for ref in members if table.alive(ref)}

    async def _await_exit(self, job: _Job) -> ExitRecord | None:
        """The supervisor writes exit.json right after reaping the shell; give it a moment."""
        deadline = time.monotonic() + EXIT_FILE_WAIT
        supervisor = job.record.supervisor
        interval = 0.002
        while True:
            exit_record = _read_exit(job)
            if exit_record is not None or time.monotonic() >= deadline:
                return exit_record
            if supervisor is None or not supervisor.alive():
                return _read_exit(job)
            await asyncio.sleep(interval)
            interval = min(0.05, interval * 2)

    # ------------------------------------------------------------------------------ finishing

    def _finish_if_exited(self, job: _Job) -> bool:
        exit_record = _read_exit(job)
        if exit_record is None:
            return False
        self._finish_exited(job, exit_record)
        return True

    def _finish_exited(self, job: _Job, exit_record: ExitRecord | None, *, lost: str | None = None) -> None:
        """The job ended by itself (or its stop completed while no agent was up).

        Without ``exit_record`` its rc is unknown; ``lost`` says why, by default that its processes
        are gone.
        """
        stop_reason = job.record.stop_reason
        if exit_record is None:
            prefix = f"{stop_reason}; " if stop_reason else ""
            reason = prefix + (lost or _lost_reason(job.record))
            self._finish(job, JobStatus.FAILED, rc=None, reason=reason)
            log.warning("job %s: %s", job.record.job_id, job.record.reason)
        else:
            self._finish_with_exit_code(job, exit_record)
        if stop_reason is not None:  # the stop was asked for, and the log says so, as for any stop
            _append_log_line(
                job.dir,
                f"[agentic-agent {_now().isoformat()}] job stopped: {stop_reason} (rc={job.record.rc})",
            )

    def _finish_with_exit_code(self, job: _Job, exit_record: ExitRecord) -> None:
        rc = exit_record.rc
        if job.record.stop_reason is not None:
            status, reason = JobStatus.FAILED, job.record.stop_reason
        elif rc == 0:
            status, reason = JobStatus.SUCCEEDED, "exited with code 0"
        elif rc > 0:
            status, reason = JobStatus.FAILED, f"exited with code {rc}"
        else:
            status, reason = JobStatus.FAILED, f"killed by {_signal_name(-rc)} (not sent by the agent)"
        self._finish(job, status, rc=rc, reason=reason, finished_at=exit_record.finished_at)
        log.info("job %s ended: %s", job.record.job_id, reason)

    def _finish(
        self,
        job: _Job,
        status: JobStatus,
        *,
        rc: int | None,
        reason: str,
        finished_at: datetime | None = None,
    ) -> None:
        job.save(
            replace(
                job.record,
                status=status,
                rc=rc,
                reason=reason,
                finished_at=finished_at or _now(),
                descendants=frozenset(),
            )
        )

    # ------------------------------------------------------------------------------ adoption

    async def _adopt(self, job: _Job) -> None:
        record = job.record
        unverifiable = self._unverifiable(record)
        if unverifiable is not None:
            self._finish_exited(job, _read_exit(job), lost=unverifiable)
            return
        if record.leader is None:  # the agent died while starting it
            announced = await self._await_leader(job)
            if announced is None:
                self._finish(
                    job, JobStatus.FAILED, rc=None, reason="the agent stopped before the job started"
                )
                return
            self._mark_running(job, announced)
            record = job.record
        if self._finish_if_exited(job):
            return
        leader, supervisor = record.leader, record.supervisor
        if not (leader and leader.alive()) and not (supervisor and supervisor.alive()):
            self._finish_exited(job, _read_exit(job))
            return
        log.info("adopted job %s: pid %s", record.job_id, record.pid)
        if record.stop_reason is not None:
            self._background(self._stop(job, force=False, reason=record.stop_reason))

    def _unverifiable(self, record: JobRecord) -> str | None:
        """Why the recorded processes cannot be checked against this machine's, if they cannot."""
        if record.state_format < STATE_FORMAT:
            pid = f" (PID {record.pid})" if record.pid is not None else ""
            return (
                f"recorded by an older agent (state format {record.state_format}) that identified "
                f"processes by wall-clock time, which cannot be verified: its processes{pid} were left "
                "alone, and its exit code is unknown"
            )
        if record.boot_id != self._boot_id:
            return (
                f"the machine has restarted since the job started (boot id {record.boot_id}, now "
                f"{self._boot_id}), which ended its processes; its exit code is unknown"
            )
        return None

    async def _await_leader(self, job: _Job) -> LeaderRecord | None:
        supervisor = job.record.supervisor
        deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
        while True:
            leader = _read_leader(job)
            if leader is not None:
                return leader
            if supervisor is None or not supervisor.alive() or time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------------------ monitoring

    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                log.exception("job monitor tick failed; continuing")
            await asyncio.sleep(self._config.poll_seconds)

    async def _tick(self) -> None:
        self._supervisors = [proc for proc in self._supervisors if proc.poll() is None]  # reap
        running = [job for job in self._jobs.values() if job.record.status is JobStatus.RUNNING]
        if not running:
            return
        table = await asyncio.to_thread(ProcessTable.scan)
        for job in running:
            if job.lock.locked():
                continue  # a start or stop is in progress and will settle the job itself
            async with job.lock:
                self._check(job, table)

    def _check(self, job: _Job, table: ProcessTable) -> None:
        if job.record.status.finished or self._finish_if_exited(job):
            return
        record = job.record
        roots = [ref for ref in (record.leader, record.supervisor) if ref is not None]
        if not any(table.alive(ref) for ref in roots):
            self._finish_exited(job, _read_exit(job))
            return
        seen: set[ProcessRef] = set()
        for root in (record.supervisor, record.leader):
            if root is not None:
                seen |= table.descendants(root)  # empty for a root that is gone
        seen -= {record.leader}
        tracked = frozenset({ref for ref in record.descendants if table.alive(ref)} | seen)
        if tracked != record.descendants:
            job.save(replace(record, descendants=tracked), durable=False)
        self._check_timeout(job)

    def _check_timeout(self, job: _Job) -> None:
        record, leader = job.record, job.record.leader
        if record.timeout_seconds is None or leader is None or job.timeout_fired:
            return
        if leader.running_for() < record.timeout_seconds:  # not now - started_at: the wall clock may step
            return
        job.timeout_fired = True
        reason = f"timeout: still running after timeout_seconds={record.timeout_seconds:g}"
        self._background(self._stop(job, force=False, reason=reason))

    def _background(self, coro: Coroutine[Any, Any, StopResult]) -> asyncio.Task[StopResult]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background job task failed", exc_info=task.exception())


def _default_cwd(run_as: str | None, env: Mapping[str, str]) -> str:
    """The agent's working directory; for ``run_as``, that user's home if it exists, else ``/``."""
    if run_as is None:
        return os.getcwd()
    home = env.get("HOME", "/")
    return home if Path(home).is_dir() else "/"


def _lost_reason(record: JobRecord) -> str:
    """Why a job ended with an unknown rc: its processes are gone and no exit.json was written.

    A recorded PID that now belongs to another process (other start ticks) is named, to make clear
    that the agent saw it and left that process alone.
    """
    reused = sorted(
        {
            ref.pid
            for ref in (record.leader, record.supervisor)
            if ref is not None and not ref.exists() and ProcessRef.of(ref.pid) is not None
        }
    )
    detail = (
        f" (PID {', '.join(map(str, reused))} now belongs to another process, which was left alone)"
        if reused
        else ""
    )
    return (
        f"the job's processes are gone and its supervisor recorded no exit code{detail}; "
        "its exit code is unknown"
    )


def _already_finished(record: JobRecord) -> StopResult:
    return StopResult(
        ok=True,
        message=f"job {record.job_id} had already finished",
        status=record.status,
        rc=record.rc,
        action=StopAction.ALREADY_FINISHED,
        signal=None,
        reason=record.reason,
    )


def _read_exit(job: _Job) -> ExitRecord | None:
    try:
        return job.dir.read_exit()
    except StateError as exc:
        log.warning("job %s: %s", job.record.job_id, exc)
        return None


def _read_leader(job: _Job) -> LeaderRecord | None:
    try:
        return job.dir.read_leader()
    except StateError as exc:
        log.warning("job %s: %s", job.record.job_id, exc)
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _read_log_chunk(job_dir: JobDir, offset: int, limit: int) -> tuple[bytes, int]:
    """Up to ``limit`` bytes from ``offset`` and the log's size, seeking only within the log.

    A seek past the file system's largest file size fails (EINVAL on ext4 beyond 16 TiB): an offset at
    or past the end is answered from the size alone. The log only grows, so an offset below the size
    seen here is inside the file when it is read.
    """
    try:
        size = job_dir.log_path.stat().st_size
    except FileNotFoundError:  # not started yet: an empty log
        return b"", 0
    if offset >= size or limit == 0:
        return b"", size
    return job_dir.read_log(offset, limit)


def _append_log_line(job_dir: JobDir, line: str) -> None:
    try:
        with job_dir.log_path.open("rb") as existing:
            existing.seek(-1, os.SEEK_END)
            needs_newline = existing.read(1) != b"\n"
    except (FileNotFoundError, OSError):
        needs_newline = False
    job_dir.append_log(("\n" if needs_newline else "") + line + "\n")


def _handshake(proc: subprocess.Popen[bytes], spec: bytes) -> LeaderRecord | str:
    """Send the job spec to the supervisor; read its one-line answer: the job's leader, or its error."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(spec)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died early; the empty answer below says so
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
    buffer = b""
    try:
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer within {SUPERVISOR_START_TIMEOUT:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buffer += chunk
    finally:
        proc.stdout.close()
    if not buffer.strip():
        raise ValueError("the supervisor exited without an answer (see supervisor.log of the job)")
    answer = json.loads(buffer.split(b"\n", 1)[0])
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return str(answer["error"])
    try:
        return LeaderRecord.from_json(answer)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unexpected answer from the supervisor: {answer!r} ({exc})") from None
