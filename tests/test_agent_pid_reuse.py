"""No wrong kills: a PID is trusted only together with its start ticks, so a reused PID is never signalled.

Each test points a job's recorded PIDs at a bystander, a process the test started itself that holds the
PID now but has different start ticks (as a reused PID would), by editing the job's state on disk
while no agent runs. The restarted agent must leave the bystander alone however the PID is recorded:
as the job's leader, process group, supervisor or one of its descendants.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from agent.process_tree import ProcessRef
from agent_api.client import AgentClient, JobInfo, RunPayload, StopResult
from harness.agent import AgentProcess
from harness.processes import wait_until


@contextmanager
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process in a session and process group of its own; any TERM or KILL ends it."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def killed_afterwards(refs: list[ProcessRef]) -> Iterator[list[ProcessRef]]:
    """Job processes a failing test must not leave behind (adopted jobs are nobody's child)."""
    try:
        yield refs
    finally:
        for ref in refs:
            ref.send(signal.SIGKILL)


def call(agent: AgentProcess, job_id: str, what: str, command: str = "") -> Any:
    async def main() -> JobInfo | StopResult:
        async with AgentClient(agent.url, agent.token) as client:
            if what == "run":
                return await client.run(job_id, RunPayload(command=command))
            if what == "stop":
                return await client.stop(job_id, reason="TI marked failed")
            return await client.get(job_id)

    return asyncio.run(main())


def state_file(home: Path, job_id: str) -> Path:
    return home / "jobs" / job_id / "state.json"


def test_a_job_whose_pids_were_reused_ends_without_signalling_anyone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with killed_afterwards([]) as job_processes:
        with AgentProcess(home) as first:
            call(first, "reused", "run", "exec sleep 300")
            assert first.terminate() == 0  # a graceful shutdown: the job keeps running
        state = json.loads(state_file(home, "reused").read_text())
        leader, supervisor = ProcessRef(state["pid"], state["start_ticks"]), ProcessRef(*state["supervisor"])
        job_processes += [leader, supervisor]
        # The job dies while no agent runs, its supervisor first, so no exit code is recorded ...
        supervisor.send(signal.SIGKILL)
        leader.send(signal.SIGKILL)
        wait_until(lambda: not leader.alive() and not supervisor.alive(), what="job and supervisor gone")

        with bystander() as other:
            # ... and its PIDs now belong to another process, with other start ticks.
            other_ref = ProcessRef.of(other.pid)
            assert other_ref is not None and other_ref.start_ticks not in (
                leader.start_ticks,
                supervisor.start_ticks,
            )
            state |= {
                "pid": other.pid,
                "pgid": other.pid,  # the bystander leads a process group with that id, too
                "supervisor": [other.pid, supervisor.start_ticks],
                "descendants": [[other.pid, leader.start_ticks - 1]],
                "stop_reason": "TI marked failed",  # a stop that a crash cut short: the agent resumes it
            }
            state_file(home, "reused").write_text(json.dumps(state))

            with AgentProcess(home) as restarted:
                info = call(restarted, "reused", "get")
                assert other.poll() is None, "the bystander was signalled"
                assert (info.status, info.rc, info.pid) == ("FAILED", None, other.pid)
                assert info.reason.startswith("TI marked failed; ")
                assert f"PID {other.pid} now belongs to another process, which was left alone" in info.reason
                assert "exit code is unknown" in info.reason
                result = call(restarted, "reused", "stop")
                assert (result.action, result.signal, result.rc) == ("already_finished", None, None)
                assert other.poll() is None, "the bystander was signalled"
            log = (home / "jobs" / "reused" / "output.log").read_text()
            assert log.rstrip().splitlines()[-1].endswith("job stopped: TI marked failed (rc=None)")


def test_a_stop_kills_the_job_but_spares_a_recorded_descendant_whose_pid_was_reused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with killed_afterwards([]) as job_processes, bystander() as other:
        with AgentProcess(home) as first:
            info = call(first, "live", "run", "sleep 300 & wait")
            assert first.terminate() == 0
        state = json.loads(state_file(home, "live").read_text())
        leader = ProcessRef(state["pid"], state["start_ticks"])
        job_processes += [leader, ProcessRef(*state["supervisor"])]
        other_ref = ProcessRef.of(other.pid)
        assert other_ref is not None
        impostor = [other.pid, other_ref.start_ticks - 1]  # an earlier process that had this PID
        state |= {"descendants": [*state["descendants"], impostor], "stop_reason": "TI marked failed"}
        state_file(home, "live").write_text(json.dumps(state))

        with AgentProcess(home) as restarted:
            # The adoption resumes the stop at once, before any monitor tick could prune the record.
            wait_until(lambda: call(restarted, "live", "get").status == "FAILED", what="resumed stop done")
            assert other.poll() is None, "the bystander was signalled"
            final = call(restarted, "live", "get")
            assert (final.pid, final.rc, final.reason) == (info.pid, -15, "TI marked failed")
            assert not leader.alive()
        log = (home / "jobs" / "live" / "output.log").read_text()
        assert (
            log.rstrip()
            .splitlines()[-1]
            .endswith("job stopped: TI marked failed (terminated with SIGTERM, rc=-15)")
        )


def test_a_job_recorded_in_state_format_1_is_left_alone_and_ends_with_a_reason(tmp_path: Path) -> None:
    """Format 1 identified processes by psutil's wall-clock create time, which a clock step breaks (see
    test_agent_clock_step). Such a record cannot be verified, so its processes are never signalled; an
    ``exit.json`` still gives the exact rc of a job that ended meanwhile."""
    home, go = tmp_path / "home", tmp_path / "go"
    with killed_afterwards([]) as job_processes:
        with AgentProcess(home) as first:
            call(first, "running", "run", "exec sleep 300")
            call(first, "ended", "run", f"while [ ! -e {go} ]; do sleep 0.05; done; exit 3")
            assert first.terminate() == 0
        for job_id in ("running", "ended"):
            state = json.loads(state_file(home, job_id).read_text())
            leader, supervisor = (
                ProcessRef(state["pid"], state["start_ticks"]),
                ProcessRef(*state["supervisor"]),
            )
            job_processes += [leader, supervisor]
            wall = {ref: psutil.Process(ref.pid).create_time() for ref in (leader, supervisor)}
            old = {
                key: value for key, value in state.items() if key not in ("format", "boot_id", "start_ticks")
            }
            old |= {
                "create_time": wall[leader],
                "supervisor": [supervisor.pid, wall[supervisor]],
                "descendants": [],
                "stop_reason": "TI marked failed",  # even a stop in progress is not resumed
            }
            state_file(home, job_id).write_text(json.dumps(old))
        running_leader, running_supervisor = job_processes[:2]
        go.touch()
        wait_until(lambda: (home / "jobs" / "ended" / "exit.json").exists(), what="job 'ended' ended")

        with AgentProcess(home) as restarted:
            info = call(restarted, "running", "get")
            assert (info.status, info.rc) == ("FAILED", None)
            assert info.reason.startswith("TI marked failed; recorded by an older agent (state format 1)")
            assert f"its processes (PID {running_leader.pid}) were left alone" in info.reason
            assert running_leader.alive() and running_supervisor.alive()
            result = call(restarted, "running", "stop")
            assert (result.action, result.signal) == ("already_finished", None)
            assert running_leader.alive() and running_supervisor.alive()
            ended = call(restarted, "ended", "get")
            assert (ended.status, ended.rc, ended.reason) == ("FAILED", 3, "TI marked failed")


def test_a_job_recorded_in_an_earlier_boot_is_left_alone_and_ends_with_a_reason(tmp_path: Path) -> None:
    """Start ticks count from boot: after a reboot, a recorded PID and start ticks may match a new,
    unrelated process. The record's boot id tells the agent not to look. The test's live job stands in
    for such a process."""
    home = tmp_path / "home"
    with killed_afterwards([]) as job_processes:
        with AgentProcess(home) as first:
            call(first, "last-boot", "run", "exec sleep 300")
            assert first.terminate() == 0
        state = json.loads(state_file(home, "last-boot").read_text())
        leader, supervisor = ProcessRef(state["pid"], state["start_ticks"]), ProcessRef(*state["supervisor"])
        job_processes += [leader, supervisor]
        earlier_boot = str(uuid.uuid4())
        state |= {"boot_id": earlier_boot, "stop_reason": "TI marked failed"}
        state_file(home, "last-boot").write_text(json.dumps(state))

        with AgentProcess(home) as restarted:
            info = call(restarted, "last-boot", "get")
            assert (info.status, info.rc) == ("FAILED", None)
            assert info.reason.startswith(
                f"TI marked failed; the machine has restarted since the job started (boot id {earlier_boot}"
            )
            assert leader.alive() and supervisor.alive()
            result = call(restarted, "last-boot", "stop")
            assert (result.action, result.signal) == ("already_finished", None)
            assert leader.alive() and supervisor.alive()
