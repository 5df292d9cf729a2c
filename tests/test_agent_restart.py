"""Jobs outlive the agent: a new agent on the same home adopts them, with their exact exit codes."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from agent.process_tree import ProcessRef
from agent_api.client import AgentClient, AgentUnavailable, JobInfo, RunPayload, StopResult
from harness.agent import AgentProcess
from harness.processes import wait_until


class Leftovers:
    """Processes a test must not leave behind if it fails half-way (adopted jobs are nobody's child)."""

    def __init__(self) -> None:
        self.refs: list[ProcessRef] = []

    def track_job(self, home: Path, job_id: str) -> None:
        state = json.loads((home / "jobs" / job_id / "state.json").read_text())
        self.refs.append(ProcessRef(state["pid"], state["start_ticks"]))
        self.refs.append(ProcessRef(*state["supervisor"]))

    def kill_all(self) -> None:
        for ref in self.refs:
            ref.send(signal.SIGKILL)


@contextmanager
def leftovers() -> Iterator[Leftovers]:
    tracked = Leftovers()
    try:
        yield tracked
    finally:
        tracked.kill_all()


def get(agent: AgentProcess, job_id: str) -> JobInfo:
    async def main() -> JobInfo:
        async with AgentClient(agent.url, agent.token) as client:
            return await client.get(job_id)

    return asyncio.run(main())


def run(agent: AgentProcess, job_id: str, command: str) -> JobInfo:
    async def main() -> JobInfo:
        async with AgentClient(agent.url, agent.token) as client:
            return await client.run(job_id, RunPayload(command=command))

    return asyncio.run(main())


def stop(agent: AgentProcess, job_id: str, reason: str) -> StopResult:
    async def main() -> StopResult:
        async with AgentClient(agent.url, agent.token) as client:
            return await client.stop(job_id, reason=reason)

    return asyncio.run(main())


def pids_in(path: Path, count: int) -> list[ProcessRef]:
    wait_until(
        lambda: path.exists() and len(path.read_text().split()) >= count, what=f"{count} pids in {path}"
    )
    refs = [ProcessRef.of(int(pid)) for pid in path.read_text().split()[:count]]
    assert all(refs)
    return [ref for ref in refs if ref is not None]


def test_jobs_survive_an_agent_crash_and_are_adopted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    pids = tmp_path / "pids"
    with leftovers() as tracked:
        crashed = AgentProcess(home).start()
        try:
            running = run(crashed, "long-job", f"sleep 300 & echo $! > {pids}; wait")
            run(crashed, "short-job", "sleep 1; exit 4")
            tracked.track_job(home, "long-job")
            tree = pids_in(pids, 1)
            crashed.kill()  # SIGKILL to the agent's own PID only
        finally:
            crashed.stop()
        assert running.pid is not None and ProcessRef.of(running.pid) is not None
        assert all(ref.alive() for ref in tree)
        wait_until(lambda: (home / "jobs" / "short-job" / "exit.json").exists(), what="short job ended")

        with AgentProcess(home) as restarted:
            adopted = get(restarted, "long-job")
            assert (adopted.status, adopted.pid, adopted.started_at) == (
                "RUNNING",
                running.pid,
                running.started_at,
            )
            ended = get(restarted, "short-job")
            assert (ended.status, ended.rc, ended.reason) == ("FAILED", 4, "exited with code 4")
            assert "adopted job long-job" in restarted.log_text()

            result = stop(restarted, "long-job", reason="after restart")
            assert (result.action, result.status, result.rc) == ("terminated", "FAILED", -15)
            wait_until(lambda: not any(ref.exists() for ref in tree), timeout=3, what="tree reaped")


def test_graceful_shutdown_leaves_jobs_running_and_their_exit_is_seen_after_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    go = tmp_path / "go"
    with leftovers() as tracked:
        with AgentProcess(home) as first:
            run(first, "waits-for-go", f"while [ ! -e {go} ]; do sleep 0.05; done; exit 5")
            tracked.track_job(home, "waits-for-go")
            assert first.terminate() == 0  # SIGTERM: a graceful shutdown
        assert all(ref.alive() for ref in tracked.refs), "the job or its supervisor died with the agent"

        with AgentProcess(home) as second:
            assert get(second, "waits-for-go").status == "RUNNING"
            go.touch()
            wait_until(lambda: get(second, "waits-for-go").status == "FAILED", what="adopted job ended")
            info = get(second, "waits-for-go")
            assert (info.rc, info.reason) == (5, "exited with code 5")


def test_without_its_supervisor_a_job_is_still_adopted_and_stoppable_but_its_rc_is_unknown(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    with leftovers() as tracked:
        crashed = AgentProcess(home).start()
        try:
            run(crashed, "orphan", "exec sleep 300")  # the leader is the whole job
            run(crashed, "vanished", "exec sleep 300")
            tracked.track_job(home, "orphan")
            tracked.track_job(home, "vanished")
            crashed.kill()
        finally:
            crashed.stop()
        orphan_leader, orphan_supervisor, vanished_leader, vanished_supervisor = tracked.refs
        for ref in (orphan_supervisor, vanished_supervisor, vanished_leader):
            ref.send(signal.SIGKILL)
        wait_until(lambda: not vanished_leader.alive() and not orphan_supervisor.alive(), what="kills done")

        with AgentProcess(home) as restarted:
            vanished = get(restarted, "vanished")
            assert (vanished.status, vanished.rc) == ("FAILED", None)
            assert "unknown" in (vanished.reason or "")
            assert get(restarted, "orphan").status == "RUNNING"
            began = time.monotonic()
            result = stop(restarted, "orphan", reason="cleanup")
            assert (result.action, result.status, result.rc) == ("terminated", "FAILED", None)
            assert time.monotonic() - began < 5
            assert not orphan_leader.alive()


@pytest.mark.parametrize("state", ["{not json", '{"job_id": "other-name", "status": "RUNNING"}'])
def test_unreadable_state_does_not_stop_the_agent_from_starting(tmp_path: Path, state: str) -> None:
    home = tmp_path / "home"
    (home / "jobs" / "broken").mkdir(parents=True)
    (home / "jobs" / "broken" / "state.json").write_text(state)
    with AgentProcess(home) as agent:
        assert "skipping job" in agent.log_text()
        # Not "not known" (the sidecar ends a job its agent denies knowing: its process may run), and
        # a stop leaves its state as it is instead of writing a tombstone over it.
        headers = {"Authorization": f"Bearer {agent.token}"}
        read = httpx.get(f"{agent.url}/jobs/broken", headers=headers, timeout=10)
        assert read.status_code == 500 and "cannot be read" in read.json()["error"], read.text
        stopped = httpx.post(f"{agent.url}/stop/broken", headers=headers, json={}, timeout=10)
        assert stopped.status_code == 500 and "cannot be read" in stopped.json()["error"], stopped.text
        assert (home / "jobs" / "broken" / "state.json").read_text() == state


def test_a_stop_cut_short_by_an_agent_crash_is_finished_by_the_next_agent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    state_file = home / "jobs" / "stubborn" / "state.json"
    with leftovers() as tracked:
        crashed = AgentProcess(home, grace_seconds=60.0).start()
        try:
            run(crashed, "stubborn", "trap '' TERM; sleep 300 & wait")
            tracked.track_job(home, "stubborn")

            async def stop_then_crash() -> None:
                async with AgentClient(crashed.url, crashed.token) as client:
                    stopping = asyncio.create_task(client.stop("stubborn", reason="TI marked failed"))
                    while json.loads(state_file.read_text())["stop_reason"] is None:
                        await asyncio.sleep(0.02)
                    crashed.kill()  # mid-grace: SIGTERM sent, SIGKILL not yet
                    with pytest.raises(AgentUnavailable):
                        await stopping

            asyncio.run(stop_then_crash())
        finally:
            crashed.stop()
        leader = tracked.refs[0]
        assert leader.alive(), "the job ignores SIGTERM, so only the next agent's SIGKILL can end it"

        with AgentProcess(home, grace_seconds=0.2) as restarted:
            wait_until(lambda: get(restarted, "stubborn").status == "FAILED", what="resumed stop finished")
            info = get(restarted, "stubborn")
            assert (info.rc, info.reason) == (-9, "TI marked failed")
            assert not leader.alive()
