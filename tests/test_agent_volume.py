"""At volume: 500 jobs started and stopped in a row leave no zombie, no open fd and no process behind."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import psutil

from agent.process_tree import ProcessRef
from agent_api.client import AgentClient, RunPayload
from harness.agent import AgentProcess
from harness.processes import wait_until

JOBS = 500
BATCH = 4  # jobs started and stopped concurrently; small, so that the test is about volume, not load
FD_SLACK = 4  # fds the agent may hold after the run beyond its count before (a lazily opened file)


def agent_tree(agent: AgentProcess) -> list[psutil.Process]:
    return psutil.Process(agent.pid).children(recursive=True)


def idle_fds(agent: AgentProcess, *, at_most: int | None = None) -> int:
    """The agent's fd count once the client's closed connections are gone on its side too (the
    server closes them asynchronously): after a short pause, or as soon as it is down to ``at_most``."""
    process = psutil.Process(agent.pid)
    if at_most is None:
        time.sleep(0.5)
    else:
        try:
            wait_until(lambda: process.num_fds() <= at_most, timeout=5, what=f"at most {at_most} fds")
        except TimeoutError:
            pass  # the assertion that follows shows the figure
    return process.num_fds()


def zombies(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for process in processes:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


async def run_and_stop(client: AgentClient, refs: list[ProcessRef]) -> None:
    job_id = f"vol-{uuid.uuid4().hex[:12]}"
    info = await client.run(job_id, RunPayload(command="exec sleep 300"))
    assert info.status == "RUNNING" and info.pid is not None, info
    leader = ProcessRef.of(info.pid)
    assert leader is not None
    refs.append(leader)
    supervisor = psutil.Process(info.pid).ppid()
    supervisor_ref = ProcessRef.of(supervisor)
    if supervisor_ref is not None:
        refs.append(supervisor_ref)
    result = await client.stop(job_id, reason="volume test")
    assert (result.ok, result.action, result.rc) == (True, "terminated", -15), result


async def run_jobs(agent: AgentProcess, count: int, refs: list[ProcessRef]) -> None:
    async with AgentClient(agent.url, agent.token) as client:
        for _ in range(count // BATCH):
            await asyncio.gather(*(run_and_stop(client, refs) for _ in range(BATCH)))


def test_500_jobs_started_and_stopped_leave_no_zombie_fd_or_process(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "home", grace_seconds=5.0) as agent:
        warm_up: list[ProcessRef] = []
        asyncio.run(run_jobs(agent, 2 * BATCH, warm_up))  # thread pool, connection pool, log handlers
        wait_until(lambda: not agent_tree(agent), what="warm-up supervisors reaped")
        fds_before = idle_fds(agent)
        refs: list[ProcessRef] = []

        began = time.monotonic()
        asyncio.run(run_jobs(agent, JOBS, refs))
        elapsed = time.monotonic() - began

        # Supervisors exit once their job is gone and the agent reaps them on its next monitor tick;
        # an unreaped one is a zombie, which psutil still lists among the agent's descendants.
        try:
            wait_until(lambda: not agent_tree(agent), timeout=5, what="every supervisor gone and reaped")
        except TimeoutError:
            left = agent_tree(agent)
            raise AssertionError(
                f"{len(left)} descendants left, {len(zombies(left))} of them zombies"
            ) from None
        fds_after = idle_fds(agent, at_most=fds_before + FD_SLACK)
        print(f"\n{JOBS} jobs run and stopped in {elapsed:.1f} s; agent fds {fds_before} -> {fds_after}")
        assert len(refs) == 2 * JOBS
        assert not [ref for ref in refs if ref.exists()], "a job or supervisor is still there"
        assert fds_after <= fds_before + FD_SLACK, (fds_before, fds_after)
