"""A step of the wall clock (NTP, hypervisor time sync) changes nothing about which processes a job owns.

How a clock step is simulated without touching the system clock: the kernel reports the boot time
``btime`` in ``/proc/stat`` as *wall clock now minus time since boot*, so stepping the clock by Δ
moves ``btime`` by Δ, and with it every wall-clock create time derived from it (psutil's
``create_time()`` is ``btime`` plus the start ticks). :func:`stepped_clock` gives a process a private
mount namespace in which a copy of ``/proc/stat`` with ``btime + Δ`` is bind-mounted over the real one:
inside, every wall-clock create time is off by Δ, exactly as after a step, and nothing outside changes.
Each test checks that the simulation bites (psutil's create time inside does move by Δ, so an identity
built on it would break) before it checks that the agent's identity (start ticks) does not.

The clock the agent reads for "now" cannot be stepped that way; the timeout test uses the equivalent:
moving the recorded ``started_at`` back by Δ makes ``now - started_at`` what it would be after a step
of +Δ.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from agent.process_tree import ProcessRef
from agent_api.client import AgentClient, JobInfo, RunPayload, StopResult
from harness.agent import REPO_ROOT, AgentProcess
from harness.processes import wait_until

STEP = 3600  # seconds the wall clock is stepped forward


class SteppedClock(NamedTuple):
    prefix: list[str]  # runs the rest of a command line as if the clock had been stepped
    proc_stat: str  # what /proc/stat reads there


def stepped_clock(tmp_path: Path, seconds: int) -> SteppedClock:
    """A private view of /proc/stat in which the wall clock was stepped by ``seconds``."""
    lines = Path("/proc/stat").read_text().splitlines()
    btime = next(int(line.split()[1]) for line in lines if line.startswith("btime "))
    fake = tmp_path / f"proc-stat-btime-{seconds:+d}"
    fake.write_text(
        "\n".join(f"btime {btime + seconds}" if line.startswith("btime ") else line for line in lines) + "\n"
    )
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.append("--map-root-user")  # an unprivileged user namespace, where the kernel allows one
    prefix += ["sh", "-c", 'mount --bind "$0" /proc/stat && exec "$@"', str(fake)]
    try:
        probe = subprocess.run([*prefix, "cat", "/proc/stat"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("unshare(1) is not installed")
    if probe.returncode != 0 or f"btime {btime + seconds}\n" not in probe.stdout:
        pytest.skip(f"cannot bind-mount over /proc/stat in a mount namespace: {probe.stderr.strip()}")
    return SteppedClock(prefix, fake.read_text())


def run_python(prefix: list[str], code: str) -> Any:
    """Run ``code`` (which prints one JSON value) under ``prefix``, with the repository importable."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


def wall_create_times(prefix: list[str], pids: list[int]) -> list[float]:
    """psutil's create times of ``pids`` as seen under ``prefix``."""
    return list(
        run_python(prefix, f"import psutil; print([psutil.Process(p).create_time() for p in {pids}])")
    )


def test_a_process_keeps_its_identity_when_the_wall_clock_steps(tmp_path: Path) -> None:
    """The same live process, looked at before and after the (simulated) step."""
    prefix = stepped_clock(tmp_path, STEP).prefix
    child = subprocess.Popen(["sleep", "30"])
    try:
        before = ProcessRef.of(child.pid)
        [wall_before] = wall_create_times([], [child.pid])
        [wall_after] = wall_create_times(prefix, [child.pid])
        assert wall_after == pytest.approx(wall_before + STEP), "the simulated step did not move btime"
        probe = "import json; from agent.process_tree import ProcessRef; ref = ProcessRef.of({pid}); "
        probe += "print(json.dumps([ref.pid, ref.start_ticks, ref.alive()]))"
        pid, start_ticks, alive = run_python(prefix, probe.format(pid=child.pid))
        assert ProcessRef(pid, start_ticks) == before
        assert alive
    finally:
        child.kill()
        child.wait()


@contextmanager
def killed_afterwards() -> Iterator[list[ProcessRef]]:
    """Job processes a failing test must not leave behind (adopted jobs are nobody's child)."""
    refs: list[ProcessRef] = []
    try:
        yield refs
    finally:
        for ref in refs:
            ref.send(signal.SIGKILL)


def run(agent: AgentProcess, job_id: str, payload: RunPayload) -> JobInfo:
    async def main() -> JobInfo:
        async with AgentClient(agent.url, agent.token) as client:
            return await client.run(job_id, payload)

    return asyncio.run(main())


def get(agent: AgentProcess, job_id: str) -> JobInfo:
    async def main() -> JobInfo:
        async with AgentClient(agent.url, agent.token) as client:
            return await client.get(job_id)

    return asyncio.run(main())


def stop(agent: AgentProcess, job_id: str) -> StopResult:
    async def main() -> StopResult:
        async with AgentClient(agent.url, agent.token) as client:
            return await client.stop(job_id, reason="TI marked failed")

    return asyncio.run(main())


def job_tree(home: Path, job_id: str, pids: Path) -> list[ProcessRef]:
    """The job's leader and supervisor as recorded, and the process whose PID the job wrote to ``pids``."""
    state = json.loads((home / "jobs" / job_id / "state.json").read_text())
    wait_until(lambda: pids.exists() and pids.read_text().strip(), what=f"pid in {pids}")
    child = ProcessRef.of(int(pids.read_text()))
    assert child is not None
    return [ProcessRef(state["pid"], state["start_ticks"]), ProcessRef(*state["supervisor"]), child]


def test_a_job_is_adopted_and_stopped_by_an_agent_restarted_after_a_clock_step(tmp_path: Path) -> None:
    """The job is started before the step and the agent restarted after it: with wall-clock identities
    the new agent would find none of the job's processes, call the job FAILED and never stop it."""
    home, pids = tmp_path / "home", tmp_path / "pids"
    clock = stepped_clock(tmp_path, STEP)
    with killed_afterwards() as tree:
        with AgentProcess(home) as first:
            started = run(first, "stepped", RunPayload(command=f"sleep 300 & echo $! > {pids}; wait"))
            tree += job_tree(home, "stepped", pids)
            assert first.terminate() == 0  # a graceful shutdown: the job keeps running
        pids_of_tree = [ref.pid for ref in tree]
        wall_times = wall_create_times([], pids_of_tree)

        with AgentProcess(home, command_prefix=clock.prefix) as restarted:
            seen_by_agent = Path(f"/proc/{restarted.pid}/root/proc/stat").read_text()
            assert seen_by_agent == clock.proc_stat, "the agent does not live after the step"
            stepped = wall_create_times(clock.prefix, pids_of_tree)
            assert stepped == pytest.approx([wall + STEP for wall in wall_times])

            adopted = get(restarted, "stepped")
            assert (adopted.status, adopted.pid, adopted.started_at) == (
                "RUNNING",
                started.pid,
                started.started_at,
            )
            assert "adopted job stepped" in restarted.log_text()
            time.sleep(5 * restarted.poll_seconds)  # monitor ticks compare the process table, too
            assert get(restarted, "stepped").status == "RUNNING"

            result = stop(restarted, "stepped")
            assert (result.action, result.status, result.rc) == ("terminated", "FAILED", -15)
            wait_until(lambda: not any(ref.exists() for ref in tree), timeout=3, what="job tree gone")


def test_a_clock_step_forward_does_not_fire_a_timeout_early(tmp_path: Path) -> None:
    """``timeout_seconds`` counts from the leader's start on the boot clock, not from ``started_at``.

    After the step, ``now - started_at`` is larger by Δ than the time the job has run; a timeout of
    Δ/2 measured on the wall clock would stop the job at once, one measured on the boot clock does not.
    """
    home, pids = tmp_path / "home", tmp_path / "pids"
    state_file = home / "jobs" / "patient" / "state.json"
    with killed_afterwards() as tree:
        with AgentProcess(home) as first:
            payload = RunPayload(command=f"sleep 300 & echo $! > {pids}; wait", timeout_seconds=STEP / 2)
            run(first, "patient", payload)
            tree += job_tree(home, "patient", pids)
            assert first.terminate() == 0
        state = json.loads(state_file.read_text())
        started_at = datetime.fromisoformat(state["started_at"]) - timedelta(seconds=STEP)
        state_file.write_text(json.dumps(state | {"started_at": started_at.isoformat()}))

        with AgentProcess(home) as restarted:
            time.sleep(5 * restarted.poll_seconds)  # several monitor ticks, each checking the timeout
            info = get(restarted, "patient")
            assert (info.status, info.started_at) == ("RUNNING", started_at)
            assert all(ref.alive() for ref in tree)
            assert stop(restarted, "patient").rc == -15
