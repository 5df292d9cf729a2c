"""One job the agent tracks: its directory, its record as last saved, and how that record ends.

Every change of a job (start, stop, finishing) holds :attr:`TrackedJob.lock`, so two stops, or a stop
and a natural exit, never race. Which status and reason a job ends with is decided by the pure rules in
:mod:`agent.outcome`; this module reads the supervisor's files and saves the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from agent import outcome
from agent.process_tree import ProcessRef
from agent.state import ExitRecord, JobDir, ShellRecord, StateError, StoredJob
from agent_api.protocol import AgentJobStatus

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TrackedJob:
    """A job of this agent, finished or not; ``timeout_fired`` keeps a timeout from stopping it twice."""

    dir: JobDir
    record: StoredJob
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timeout_fired: bool = False
    log_mark: int | None = None  # JobDir's log mark, once read (see JobManager.read_log's cursor)
    log_mark_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    outcome_read: bool | None = None  # a GET answered its outcome since it ended (None: not looked yet)

    def save(self, record: StoredJob, *, durable: bool = True) -> None:
        self.dir.write_state(record, durable=durable)
        self.record = record

    def save_or_hold(self, record: StoredJob, what: str) -> None:
        """Save ``record``; when the home refuses (full, read-only), hold it in memory all the same and
        say so: a stop or an end must not wait for the disk (after a restart, the job is judged from
        what its supervisor wrote)."""
        try:
            self.save(record)
        except OSError as exc:
            log.error(
                "job %s: cannot save %s in its directory (%s); going on with it in memory",
                record.job_id,
                what,
                exc.strerror or exc,
                extra={"job_id": record.job_id, "action": "job_state_not_saved"},
            )
            self.record = record

    # ------------------------------------------------------------------------------ supervisor files

    def read_exit(self) -> ExitRecord | None:
        try:
            return self.dir.read_exit()
        except StateError as exc:
            log.warning("job %s: %s", self.record.job_id, exc)
            return None

    def read_shell(self) -> ShellRecord | None:
        try:
            return self.dir.read_shell()
        except StateError as exc:
            log.warning("job %s: %s", self.record.job_id, exc)
            return None

    def append_log_line(self, line: str) -> None:
        """One line of the agent's in the job's output, on a line of its own."""
        try:
            with self.dir.log_path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                needs_newline = existing.read(1) != b"\n"
        except (FileNotFoundError, OSError):
            needs_newline = False
        self.dir.append_log(("\n" if needs_newline else "") + line + "\n")

    # ------------------------------------------------------------------------------ status changes

    def mark_running(self, shell: ShellRecord) -> None:
        self.save(
            replace(
                self.record,
                status=AgentJobStatus.RUNNING,
                pid=shell.ref.pid,
                pgid=shell.ref.pid,  # start_new_session: the shell leads its own session and group
                start_ticks=shell.ref.start_ticks,
                started_at=shell.started_at,
            )
        )

    def finish_if_exited(self) -> bool:
        exit_record = self.read_exit()
        if exit_record is None:
            return False
        self.finish_exited(exit_record)
        return True

    def finish_exited(self, exit_record: ExitRecord | None, *, lost: str | None = None) -> None:
        """The job ended by itself (or its stop completed while no agent was up).

        Without ``exit_record`` its rc is unknown; ``lost`` says why, by default that its processes
        are gone.
        """
        stop_reason = self.record.stop_reason
        if exit_record is None:
            why = lost or outcome.processes_gone(_reused_pids(self.record))
            reason = outcome.lost_reason(why, stop_reason=stop_reason)
            self.finish(AgentJobStatus.FAILED, rc=None, reason=reason)
            log.warning("job %s: %s", self.record.job_id, self.record.reason)
        else:
            status, reason = outcome.exit_outcome(exit_record.rc, stop_reason=stop_reason)
            self.finish(status, rc=exit_record.rc, reason=reason, finished_at=exit_record.finished_at)
            log.info("job %s ended: %s", self.record.job_id, reason)
        if stop_reason is not None:  # the stop was asked for, and the log says so, as for any stop
            with contextlib.suppress(OSError):  # a full disk keeps the line, not the job's end
                self.append_log_line(
                    f"[agentic-agent {datetime.now(UTC).isoformat()}] job stopped: {stop_reason} "
                    f"(rc={self.record.rc})"
                )

    def finish(
        self,
        status: AgentJobStatus,
        *,
        rc: int | None,
        reason: str,
        finished_at: datetime | None = None,
    ) -> None:
        self.save_or_hold(
            replace(
                self.record,
                status=status,
                rc=rc,
                reason=reason,
                finished_at=finished_at or datetime.now(UTC),
                descendants=frozenset(),
            ),
            "its end",
        )


def _reused_pids(record: StoredJob) -> list[int]:
    """Recorded PIDs of the job's shell and supervisor that now belong to other processes."""
    return sorted(
        {
            ref.pid
            for ref in (record.shell, record.supervisor)
            if ref is not None and not ref.exists() and ProcessRef.of(ref.pid) is not None
        }
    )
