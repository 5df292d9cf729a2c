"""How a job's end becomes its final status and reason: pure rules, no I/O.

The supervisor's ``exit.json`` gives the exact ``rc``: 0 is ``SUCCEEDED``, anything else ``FAILED`` with
a reason that says why (an exit code, or a signal the agent did not send). A job whose stop was asked for
is ``FAILED`` with the stop's reason whatever its ``rc``. A job whose processes are gone without an
``exit.json`` (its supervisor was killed too) is ``FAILED`` with ``rc`` null, and so is a job whose
processes the agent cannot verify (recorded in an earlier boot, or in state format 1): its reason says
that nothing was signalled and why.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from agent.state import STATE_FORMAT, StoredJob
from agent_api.protocol import AgentJobStatus, StopAction, StopResult


def exit_outcome(rc: int, *, stop_reason: str | None) -> tuple[AgentJobStatus, str]:
    """Status and reason of a job whose supervisor recorded ``rc`` (``-N``: killed by signal ``N``)."""
    if stop_reason is not None:
        return AgentJobStatus.FAILED, stop_reason
    if rc == 0:
        return AgentJobStatus.SUCCEEDED, "exited with code 0"
    if rc > 0:
        return AgentJobStatus.FAILED, f"exited with code {rc}"
    return AgentJobStatus.FAILED, f"killed by {signal_name(-rc)} (not sent by the agent)"


def lost_reason(why: str, *, stop_reason: str | None) -> str:
    """Reason of a job that ended ``FAILED`` with an unknown rc; a stop that was asked for comes first."""
    return f"{stop_reason}; {why}" if stop_reason else why


def processes_gone(reused_pids: Sequence[int]) -> str:
    """Why the rc is unknown: the processes are gone and no exit.json was written.

    ``reused_pids`` are recorded PIDs that now belong to other processes (other start ticks): they are
    named, to make clear that the agent saw them and left those processes alone.
    """
    detail = (
        f" (PID {', '.join(map(str, reused_pids))} now belongs to another process, which was left alone)"
        if reused_pids
        else ""
    )
    return (
        f"the job's processes are gone and its supervisor recorded no exit code{detail}; "
        "its exit code is unknown"
    )


def unverifiable(record: StoredJob, *, boot_id: str) -> str | None:
    """Why the recorded processes cannot be checked against this machine's, if they cannot."""
    if record.state_format < STATE_FORMAT:
        pid = f" (PID {record.pid})" if record.pid is not None else ""
        return (
            f"recorded by an older agent (state format {record.state_format}) that identified "
            f"processes by wall-clock time, which cannot be verified: its processes{pid} were left "
            "alone, and its exit code is unknown"
        )
    if record.boot_id != boot_id:
        return (
            f"the machine has restarted since the job started (boot id {record.boot_id}, now "
            f"{boot_id}), which ended its processes; its exit code is unknown"
        )
    return None


def already_finished(record: StoredJob) -> StopResult:
    """The answer to a stop of a job that has ended: its recorded status and rc, nothing sent."""
    return StopResult(
        ok=True,
        message=f"job {record.job_id} had already finished",
        status=record.status,
        rc=record.rc,
        action=StopAction.ALREADY_FINISHED,
        signal=None,
        reason=record.reason,
    )


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
