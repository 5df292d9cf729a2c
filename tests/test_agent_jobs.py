"""Jobs on a real agent process: exit codes, logs, and stopping real process trees."""

from __future__ import annotations

import asyncio
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.process_tree import ProcessRef
from agent_api.client import AgentClient, AgentRejected, JobInfo, RunPayload
from harness.agent import AgentProcess, new_id, with_client
from harness.processes import wait_until

GRACE = 0.5


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path_factory.mktemp("agent-jobs") / "home", grace_seconds=GRACE) as proc:
        yield proc


@pytest.fixture(scope="module")
def patient_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent with a long grace period, to tell an immediate SIGKILL from one after grace."""
    with AgentProcess(tmp_path_factory.mktemp("agent-patient") / "home", grace_seconds=30.0) as proc:
        yield proc


async def until_finished(client: AgentClient, job_id: str, timeout: float = 10.0) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = await client.get(job_id)
        if info.status.finished:
            return info
        assert time.monotonic() < deadline, f"job {job_id} still {info.status} after {timeout} s"
        await asyncio.sleep(0.05)


async def pids_from(path: Path, count: int, timeout: float = 10.0) -> list[ProcessRef]:
    """PIDs a job wrote to ``path`` (one per line), as verified refs taken while they run."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            refs = [ProcessRef.of(int(pid)) for pid in lines[:count]]
            assert all(refs), f"a process from {path} ended early"
            return [ref for ref in refs if ref is not None]
        assert time.monotonic() < deadline, f"{path} has {len(lines)} of {count} pids"
        await asyncio.sleep(0.02)


def assert_all_gone(refs: list[ProcessRef]) -> None:
    """Gone means reaped too: no process with that PID and start ticks, not even a zombie."""
    wait_until(lambda: not any(ref.exists() for ref in refs), timeout=3, what="processes reaped")


def assert_no_zombies_under(agent: AgentProcess) -> None:
    def clean() -> bool:
        return not [c for c in psutil.Process(agent.pid).children() if c.status() == psutil.STATUS_ZOMBIE]

    wait_until(clean, timeout=3, what="no zombie children of the agent")


# -------------------------------------------------------------------------------------- exit codes


def test_exit_0_is_succeeded_with_rc_0(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> JobInfo:
        job_id = new_id()
        started = await client.run(job_id, RunPayload(command="exit 0"))
        assert started.job_id == job_id and started.pid is not None
        return await until_finished(client, job_id)

    info = with_client(agent, scenario)
    assert (info.status, info.rc, info.reason) == ("SUCCEEDED", 0, "exited with code 0")
    assert info.started_at is not None and info.finished_at is not None
    assert info.finished_at >= info.started_at


def test_exit_3_is_failed_with_rc_3(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> JobInfo:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="echo failing >&2; exit 3"))
        return await until_finished(client, job_id)

    info = with_client(agent, scenario)
    assert (info.status, info.rc) == ("FAILED", 3)
    assert "3" in (info.reason or "")


def test_job_killed_by_someone_else_reports_negative_signal(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> JobInfo:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="kill -KILL $$"))
        return await until_finished(client, job_id)

    info = with_client(agent, scenario)
    assert (info.status, info.rc) == ("FAILED", -9)
    assert "SIGKILL" in (info.reason or "")


def test_log_is_readable_in_chunks_with_offsets(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> None:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="printf 'abcdefghij'"))
        await until_finished(client, job_id)
        first = await client.log(job_id, offset=0, limit=4)
        assert (first.data, first.next_offset, first.size) == (b"abcd", 4, 10)
        rest = await client.log(job_id, offset=first.next_offset)
        assert (rest.data, rest.next_offset, rest.size) == (b"efghij", 10, 10)
        past_end = await client.log(job_id, offset=50)
        assert (past_end.data, past_end.next_offset, past_end.size) == (b"", 50, 10)

    with_client(agent, scenario)


def test_env_and_cwd_reach_the_job_but_the_agent_token_does_not(agent: AgentProcess, tmp_path: Path) -> None:
    async def scenario(client: AgentClient) -> bytes:
        job_id = new_id()
        command = 'pwd; echo "$GREETING"; echo "token=${AGENTIC_AGENT_TOKEN:-unset}"'
        await client.run(job_id, RunPayload(command=command, cwd=str(tmp_path), env={"GREETING": "hello"}))
        await until_finished(client, job_id)
        return (await client.log(job_id)).data

    output = with_client(agent, scenario).decode()
    assert output.splitlines() == [str(tmp_path), "hello", "token=unset"]
    assert agent.token not in output


def test_the_fleet_token_does_not_reach_the_job_either(tmp_path: Path) -> None:
    """The fleet token opens registration: a job that could read it could register agents. Neither
    its default variable nor a renamed one reaches the job, nor any of the agent's own settings (its
    token, its home, where its credential is kept)."""
    command = (
        'echo "fleet=${AGENTIC_FLEET_TOKEN:-unset} renamed=${MY_FLEET:-unset} kept=${KEPT:-unset}'
        ' settings=$(env | grep -c ^AGENTIC_AGENT_)"'
    )

    async def scenario(client: AgentClient) -> bytes:
        job_id = new_id()
        await client.run(job_id, RunPayload(command=command))
        await until_finished(client, job_id)
        return (await client.log(job_id)).data

    for variable, extra in (("AGENTIC_FLEET_TOKEN", ""), ("MY_FLEET", 'router_token_env = "MY_FLEET"\n')):
        secret = f"fleet-secret-{variable.lower()}"
        home = tmp_path / variable / "home-from-env"
        with AgentProcess(
            tmp_path / variable,
            extra_env={variable: secret, "KEPT": "yes", "AGENTIC_AGENT_HOME": str(home)},
            extra_config=extra,
        ) as proc:
            output = with_client(proc, scenario).decode()
        assert output.split() == ["fleet=unset", "renamed=unset", "kept=yes", "settings=0"], output
        assert secret not in output


def test_cwd_defaults_to_the_agents_working_directory(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> bytes:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="pwd"))
        await until_finished(client, job_id)
        return (await client.log(job_id)).data

    assert with_client(agent, scenario).decode().strip() == str(psutil.Process(agent.pid).cwd())


def test_run_as_runs_the_job_as_that_user(agent: AgentProcess) -> None:
    if psutil.Process(agent.pid).uids().effective != 0:
        pytest.skip("run_as needs an agent running as root")

    async def scenario(client: AgentClient) -> bytes:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="id -un; pwd", run_as="nobody"))
        await until_finished(client, job_id)
        with pytest.raises(AgentRejected, match="no such user") as rejected:
            await client.run(new_id(), RunPayload(command="true", run_as="no-such-user-here"))
        assert rejected.value.status == 400
        return (await client.log(job_id)).data

    user, cwd = with_client(agent, scenario).decode().split()
    assert user == "nobody"
    assert cwd in ("/", pwd.getpwnam("nobody").pw_dir)


# -------------------------------------------------------------------------------------- stopping


def test_stop_kills_children_and_grandchildren(agent: AgentProcess, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = (
        f"sh -c 'sleep 300 & echo $! >> {pids}; sleep 300 & echo $! >> {pids}; wait' & "
        f"echo $! >> {pids}; sleep 300 & echo $! >> {pids}; wait"
    )

    async def scenario(client: AgentClient) -> None:
        job_id = new_id()
        info = await client.run(job_id, RunPayload(command=command))
        assert info.pid is not None
        leader = ProcessRef.of(info.pid)
        tree = await pids_from(pids, 4)
        result = await client.stop(job_id, reason="task failed in Airflow")
        assert (result.ok, result.action, result.signal) == (True, "terminated", "SIGTERM")
        assert (result.status, result.rc, result.reason) == ("FAILED", -15, "task failed in Airflow")
        assert leader is not None
        assert_all_gone([leader, *tree])
        final = await client.get(job_id)
        assert (final.status, final.rc, final.reason) == ("FAILED", -15, "task failed in Airflow")
        log = (await client.log(job_id)).data.decode()
        assert (
            log.rstrip()
            .splitlines()[-1]
            .endswith("job stopped: task failed in Airflow (terminated with SIGTERM, rc=-15)")
        )

    with_client(agent, scenario)
    assert_no_zombies_under(agent)


def test_stop_sigkills_children_that_ignore_sigterm_after_grace(agent: AgentProcess, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f"trap '' TERM; sleep 300 & echo $! >> {pids}; sleep 300 & echo $! >> {pids}; wait"

    async def scenario(client: AgentClient) -> float:
        job_id = new_id()
        await client.run(job_id, RunPayload(command=command))
        tree = await pids_from(pids, 2)
        began = time.monotonic()
        result = await client.stop(job_id, reason="marked failed")
        elapsed = time.monotonic() - began
        assert (result.action, result.signal, result.status, result.rc) == ("killed", "SIGKILL", "FAILED", -9)
        assert_all_gone(tree)
        return elapsed

    elapsed = with_client(agent, scenario)
    assert elapsed >= GRACE
    assert_no_zombies_under(agent)


def test_stop_kills_a_grandchild_that_escaped_with_setsid(agent: AgentProcess, tmp_path: Path) -> None:
    escaped = tmp_path / "escaped"
    # The subshell starts a new session and exits at once, so the escapee is nobody's descendant
    # in the job's process group; it ignores SIGTERM as well.
    command = f"( setsid sh -c 'echo $$ > {escaped}; trap \"\" TERM; sleep 300; true' & ); sleep 300"

    async def scenario(client: AgentClient) -> None:
        job_id = new_id()
        info = await client.run(job_id, RunPayload(command=command))
        [escapee] = await pids_from(escaped, 1)
        assert os.getsid(escapee.pid) != info.pid  # really left the job's session and group
        await asyncio.sleep(0.3)  # a few monitor ticks
        result = await client.stop(job_id, reason="escape test")
        assert (result.action, result.signal) == ("killed", "SIGKILL")
        assert_all_gone([escapee])

    with_client(agent, scenario)
    assert_no_zombies_under(agent)


def test_recorded_descendants_are_killed_even_after_the_supervisor_is_gone(
    agent: AgentProcess, tmp_path: Path
) -> None:
    escaped = tmp_path / "escaped"
    command = f"( setsid sh -c 'echo $$ > {escaped}; exec sleep 300' & ); sleep 300"

    async def scenario(client: AgentClient) -> None:
        job_id = new_id()
        info = await client.run(job_id, RunPayload(command=command))
        assert info.pid is not None
        [escapee] = await pids_from(escaped, 1)
        await asyncio.sleep(0.3)  # a few monitor ticks record the escapee
        supervisor = psutil.Process(info.pid).parent()
        assert supervisor is not None and "agent.supervisor" in " ".join(supervisor.cmdline())
        supervisor.kill()  # now the escapee is init's child: only the agent's record still links it
        wait_until(lambda: psutil.Process(escapee.pid).ppid() != supervisor.pid, what="escapee re-parented")
        result = await client.stop(job_id, reason="supervisor gone")
        assert (result.action, result.status, result.rc) == ("terminated", "FAILED", None)
        assert not escapee.alive()

    with_client(agent, scenario)
    assert_no_zombies_under(agent)


def test_force_stop_kills_at_once(patient_agent: AgentProcess, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f"trap '' TERM; sleep 300 & echo $! >> {pids}; wait"

    async def scenario(client: AgentClient) -> float:
        job_id = new_id()
        await client.run(job_id, RunPayload(command=command))
        tree = await pids_from(pids, 1)
        began = time.monotonic()
        result = await client.stop(job_id, force=True, reason="forced")
        elapsed = time.monotonic() - began
        assert (result.action, result.signal, result.rc) == ("killed", "SIGKILL", -9)
        assert_all_gone(tree)
        return elapsed

    assert with_client(patient_agent, scenario) < 5.0  # the grace period is 30 s


def test_timeout_seconds_stops_the_job_with_a_reason(agent: AgentProcess, tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def scenario(client: AgentClient) -> JobInfo:
        job_id = new_id()
        await client.run(
            job_id, RunPayload(command=f"sleep 300 & echo $! > {pids}; wait", timeout_seconds=0.5)
        )
        tree = await pids_from(pids, 1)
        info = await until_finished(client, job_id, timeout=10)
        assert_all_gone(tree)
        last_line = (await client.log(job_id)).data.decode().rstrip().splitlines()[-1]
        assert last_line.endswith(f"job stopped: {info.reason} (terminated with SIGTERM, rc=-15)")
        return info

    info = with_client(agent, scenario)
    assert (info.status, info.rc) == ("FAILED", -15)
    assert "timeout" in (info.reason or "")


def test_stop_twice_gives_the_same_final_answer(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> None:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="sleep 300"))
        first = await client.stop(job_id, reason="first")
        second = await client.stop(job_id, reason="second")
        assert first.action == "terminated"
        assert second.action == "already_finished" and second.signal is None
        assert (second.ok, second.status, second.rc, second.reason) == (True, first.status, first.rc, "first")

    with_client(agent, scenario)


def test_concurrent_stops_of_one_job_do_not_race(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> None:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="trap '' TERM; sleep 300 & wait"))
        results = await asyncio.gather(*(client.stop(job_id, reason=f"stop {n}") for n in range(3)))
        actions = sorted(result.action for result in results)
        assert actions == ["already_finished", "already_finished", "killed"]
        assert {(result.status, result.rc) for result in results} == {("FAILED", -9)}

    with_client(agent, scenario)


def test_stopping_a_finished_job_changes_nothing(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> None:
        job_id = new_id()
        await client.run(job_id, RunPayload(command="echo done; exit 3"))
        before = await until_finished(client, job_id)
        log_before = (await client.log(job_id)).data
        result = await client.stop(job_id, reason="too late")
        assert (result.ok, result.action, result.signal) == (True, "already_finished", None)
        assert (result.status, result.rc, result.reason) == ("FAILED", 3, before.reason)
        assert await client.get(job_id) == before
        assert (await client.log(job_id)).data == log_before

    with_client(agent, scenario)


def test_health_counts_running_jobs(agent: AgentProcess) -> None:
    async def scenario(client: AgentClient) -> None:
        before = (await client.health())["jobs_running"]
        job_id = new_id()
        await client.run(job_id, RunPayload(command="sleep 300"))
        health = await client.health()
        assert (health["status"], health["agent_id"], health["jobs_running"]) == (
            "ok",
            "test-agent",
            before + 1,
        )
        await client.stop(job_id)
        assert (await client.health())["jobs_running"] == before

    with_client(agent, scenario)
