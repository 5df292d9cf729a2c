"""The agent's catch-up read, ``GET /jobs?changed_since=<cursor>``, and the change index behind it.

The index itself (agent/changes.py) and the job manager's wiring are tested in process; what the
sidecar sees (exits, stops, a restart, refused cursors) on a real agent process; an agent that
predates change reads on a stand-in that answers as today's ``GET /jobs`` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from agent.changes import ChangeIndex
from agent.config import load_config
from agent.jobs import JobManager
from agent_api.client import AgentClient, AgentUnavailable, ChangesUnsupported, JobInfo, RunPayload
from agent_api.protocol import AgentJobStatus, ProtocolError
from harness.agent import AgentProcess, new_id, with_client
from tests.test_agent_client import against_fake
from tests.test_agent_restart import leftovers
from tests.test_openapi import DOCS, Spec

EPOCH = "0123456789abcdef"


def job(job_id: str, status: AgentJobStatus = AgentJobStatus.RUNNING, rc: int | None = None) -> JobInfo:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    finished = started if status.finished else None
    return JobInfo(job_id, status, pid=100, rc=rc, started_at=started, finished_at=finished, reason=None)


def ids(jobs: list[JobInfo]) -> list[str]:
    return [info.job_id for info in jobs]


# ------------------------------------------------------------------------------ the index, in process


@pytest.mark.fast
def test_the_jobs_changed_after_a_cursor_come_in_the_order_of_their_last_change() -> None:
    index = ChangeIndex(epoch=EPOCH)
    for name in ("a", "b", "c"):
        index.note(job(name))
    mark = index.cursor
    index.note(job("b", AgentJobStatus.FAILED, rc=3))
    index.note(job("d", AgentJobStatus.QUEUED))
    index.note(job("a", AgentJobStatus.SUCCEEDED, rc=0))
    changes = index.since(mark)
    assert (ids(changes.jobs), changes.full) == (["b", "d", "a"], False)
    assert changes.jobs[0].rc == 3 and changes.jobs[2].status is AgentJobStatus.SUCCEEDED
    assert changes.cursor == f"{EPOCH}.6"
    assert index.since(changes.cursor).jobs == []


@pytest.mark.fast
def test_the_same_state_saved_again_is_no_change() -> None:
    index = ChangeIndex(epoch=EPOCH)
    index.note(job("a"))
    mark = index.cursor
    index.note(job("a"))  # the monitor saving descendants: nothing a reader sees
    assert index.cursor == mark and index.since(mark).jobs == []


@pytest.mark.fast
def test_no_cursor_or_one_of_another_process_answers_every_job_in_full() -> None:
    index = ChangeIndex(epoch=EPOCH)
    index.note(job("a"))
    index.note(job("b"))
    for cursor in (None, "", "fedcba9876543210.1", "fedcba9876543210.999999"):
        changes = index.since(cursor)
        assert (ids(changes.jobs), changes.full, changes.cursor) == (["a", "b"], True, f"{EPOCH}.2")
    assert ChangeIndex().epoch != ChangeIndex().epoch  # random per process


@pytest.mark.parametrize(
    ("cursor", "problem"),
    [
        ("x" * 65, "longer than 64 characters"),
        ("a/b", "is invalid"),
        ("abc\x00", "is invalid"),
        ("not-a-cursor", "not a cursor this agent gives"),
        (f"{EPOCH}.01", "not a cursor this agent gives"),
        (f"{EPOCH.upper()}.1", "not a cursor this agent gives"),
        (f"{EPOCH}.3", "ahead of this agent"),
        (f"{EPOCH}.{'9' * 18}", "ahead of this agent"),
    ],
)
@pytest.mark.fast
def test_a_cursor_this_agent_cannot_have_given_is_refused_naming_the_problem(
    cursor: str, problem: str
) -> None:
    index = ChangeIndex(epoch=EPOCH)
    index.note(job("a"))
    index.note(job("b"))
    with pytest.raises(ProtocolError, match="changed_since") as refused:
        index.since(cursor)
    assert problem in str(refused.value)
    assert index.cursor == f"{EPOCH}.2" and ids(index.since(f"{EPOCH}.1").jobs) == ["b"]


@pytest.mark.fast
def test_a_job_removed_by_retention_is_no_longer_listed() -> None:
    index = ChangeIndex(epoch=EPOCH)
    index.note(job("a"))
    index.note(job("b"))
    index.forget("a")
    assert ids(index.since(None).jobs) == ["b"] and ids(index.since(f"{EPOCH}.0").jobs) == ["b"]


@pytest.mark.fast
def test_ten_changes_among_ten_thousand_jobs_are_read_from_the_tail() -> None:
    """The read walks back from the last change; bench/ has no figure for it: this pins the answer."""
    index = ChangeIndex(epoch=EPOCH)
    for n in range(10_000):
        index.note(job(f"job-{n}", AgentJobStatus.SUCCEEDED, rc=0))
    mark = index.cursor
    for n in range(0, 10_000, 1_000):
        index.note(job(f"job-{n}", AgentJobStatus.FAILED, rc=1))
    changes = index.since(mark)
    assert ids(changes.jobs) == [f"job-{n}" for n in range(0, 10_000, 1_000)]
    assert {info.rc for info in changes.jobs} == {1}


@pytest.mark.fast
def test_wait_returns_on_a_change_well_before_its_timeout() -> None:
    async def main() -> tuple[bool, float]:
        index = ChangeIndex(epoch=EPOCH)
        index.note(job("a"))
        mark = index.cursor
        asyncio.get_running_loop().call_later(0.05, index.note, job("a", AgentJobStatus.FAILED, rc=1))
        began = time.monotonic()
        changed = await index.wait(mark, timeout=30)
        return changed, time.monotonic() - began

    changed, waited = asyncio.run(main())
    assert changed and waited < 10


@pytest.mark.fast
def test_wait_is_false_after_its_timeout_and_true_at_once_when_a_read_would_say_something() -> None:
    async def main() -> list[bool]:
        index = ChangeIndex(epoch=EPOCH)
        index.note(job("a"))
        index.note(job("a", AgentJobStatus.FAILED, rc=1))
        return [
            await index.wait(index.cursor, timeout=0.05),  # nothing since: times out
            await index.wait(f"{EPOCH}.1", timeout=30),  # a change after it already
            await index.wait(None, timeout=30),  # a full read is due
            await index.wait("fedcba9876543210.1", timeout=30),  # another process's
        ]

    assert asyncio.run(main()) == [False, True, True, True]


# ------------------------------------------------------------------------------ the job manager's wiring


@pytest.mark.fast
def test_every_record_the_job_manager_saves_is_a_change_and_wakes_a_waiter(tmp_path: Path) -> None:
    """Tombstones (a stop of a job never run: no process) pass through the same JobDir as any
    change; so do the jobs read at start (adoption), in a second manager on the same home."""

    async def main() -> None:
        config = load_config(None, environ={"AGENTIC_AGENT_TOKEN": "t", "AGENTIC_AGENT_HOME": str(tmp_path)})
        jobs = JobManager(config)
        await jobs.load()
        empty, mark, full = jobs.changes_since(None)
        assert (empty, full) == ([], True)
        waiter = asyncio.create_task(jobs.wait_for_change(mark, timeout=30))
        await asyncio.sleep(0)
        await jobs.stop("never-ran", force=False, reason="task failed")
        assert await asyncio.wait_for(waiter, 10) is True
        changed, mark, full = jobs.changes_since(mark)
        assert (ids(changed), full) == (["never-ran"], False)
        assert changed[0].status is AgentJobStatus.FAILED and "task failed" in (changed[0].reason or "")
        assert jobs.changes_since(mark, statuses=frozenset({AgentJobStatus.RUNNING}))[0] == []
        await jobs.close()

        restarted = JobManager(config)
        await restarted.load()
        again, _, full = restarted.changes_since(mark)  # an earlier process's cursor
        assert (ids(again), full) == (["never-ran"], True)
        await restarted.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------ a real agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path_factory.mktemp("agent-changes") / "home") as proc:
        yield proc


async def until_changed(
    client: AgentClient, cursor: str, job_id: str, done: Callable[[JobInfo], bool]
) -> tuple[JobInfo, str]:
    """Read changes from ``cursor`` until ``job_id`` shows up in a state ``done`` accepts."""
    deadline = time.monotonic() + 15
    while True:
        changed, next_cursor, full = await client.changed_since(cursor)
        assert not full
        for info in changed:
            if info.job_id == job_id and done(info):
                return info, next_cursor
        assert time.monotonic() < deadline, f"{job_id} did not change as expected: {changed}"
        cursor = next_cursor
        await asyncio.sleep(0.05)


def test_a_job_that_exits_is_read_once_with_its_rc(agent: AgentProcess) -> None:
    job_id = new_id()

    async def scenario(client: AgentClient) -> None:
        _, start, full = await client.changed_since(None)
        assert full
        await client.run(job_id, RunPayload(command="sleep 0.3; exit 3"))
        ended, _ = await until_changed(client, start, job_id, lambda info: info.status.finished)
        # From the cursor taken before the run, one read shows the job as it is now: ended, with its rc.
        changed, cursor, full = await client.changed_since(start)
        assert not full and [info for info in changed if info.job_id == job_id] == [ended]
        assert (ended.status, ended.rc) == (AgentJobStatus.FAILED, 3)
        assert await client.changed_since(cursor) == ([], cursor, False)

    with_client(agent, scenario)


def test_a_stop_shows_up_in_the_next_read(agent: AgentProcess) -> None:
    job_id = new_id()

    async def scenario(client: AgentClient) -> None:
        _, start, _ = await client.changed_since(None)
        await client.run(job_id, RunPayload(command="sleep 60"))
        _, running = await until_changed(client, start, job_id, lambda i: i.status is AgentJobStatus.RUNNING)
        await client.stop(job_id, reason="task instance is failed in Airflow")
        changed, cursor, full = await client.changed_since(running)
        assert (ids(changed), full) == ([job_id], False)
        assert changed[0].status is AgentJobStatus.FAILED
        assert changed[0].reason == "task instance is failed in Airflow"
        assert await client.changed_since(cursor) == ([], cursor, False)

    with_client(agent, scenario)


def test_after_a_restart_an_old_cursor_gets_every_job_in_full(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with leftovers() as tracked:
        first = AgentProcess(home).start()
        try:

            async def before(client: AgentClient) -> str:
                await client.run("short", RunPayload(command="exit 4"))
                await client.run("long", RunPayload(command="sleep 300"))
                _, cursor, _ = await client.changed_since(None)
                return cursor

            old_cursor = with_client(first, before)
            tracked.track_job(home, "long")
            first.kill()  # SIGKILL to the agent alone: its jobs go on
        finally:
            first.stop()
        with AgentProcess(home) as second:
            changed, cursor, full = with_client(second, lambda client: client.changed_since(old_cursor))
            assert full and cursor != old_cursor
            by_id = {info.job_id: info for info in changed}
            assert set(by_id) == {"short", "long"}
            assert by_id["long"].status is AgentJobStatus.RUNNING  # adopted
            assert (by_id["short"].status, by_id["short"].rc) == (AgentJobStatus.FAILED, 4)
            assert with_client(second, lambda client: client.changed_since(cursor)) == ([], cursor, False)


def test_refused_cursors_are_400_as_documented_and_change_nothing(agent: AgentProcess) -> None:
    spec = Spec(DOCS / "openapi-agent.yaml")
    auth = {"Authorization": f"Bearer {agent.token}"}
    with httpx.Client(base_url=agent.url, headers=auth, timeout=30) as api:
        first = spec.check(api.get("/jobs", params={"changed_since": ""}), 200).json()
        assert first["full"] is True and set(first) == {"jobs", "cursor", "full"}
        cursor = first["cursor"]
        epoch, number = cursor.split(".")
        refused = {
            "x" * 65: "longer than 64 characters",
            "a b": "is invalid",
            "cursor-of-nobody": "not a cursor this agent gives",
            f"{epoch}.{int(number) + 1000}": "ahead of this agent",
        }
        for bad, problem in refused.items():
            error = spec.check(api.get("/jobs", params={"changed_since": bad}), 400).json()["error"]
            assert "changed_since" in error and problem in error, error
        twice = spec.check(api.get("/jobs", params=[("changed_since", cursor)] * 2), 400).json()
        assert "given 2 times" in twice["error"]
        spec.check(api.get("/jobs", params={"changed_since": cursor, "status": "BOGUS"}), 400)
        # Nothing moved: the cursor of before the refusals still has nothing to say.
        after = spec.check(api.get("/jobs", params={"changed_since": cursor}), 200).json()
        assert after == {"jobs": [], "cursor": cursor, "full": False}
        # Without changed_since, GET /jobs answers as it always did.
        assert set(spec.check(api.get("/jobs"), 200).json()) == {"jobs"}


def test_status_narrows_a_change_read_and_its_cursor_still_passes_every_change(agent: AgentProcess) -> None:
    ended_id, running_id = new_id(), new_id()

    async def scenario(client: AgentClient) -> str:
        _, start, _ = await client.changed_since(None)
        await client.run(ended_id, RunPayload(command="exit 0"))
        await client.run(running_id, RunPayload(command="sleep 60"))
        await until_changed(client, start, ended_id, lambda info: info.status.finished)
        await until_changed(client, start, running_id, lambda i: i.status is AgentJobStatus.RUNNING)
        return start

    start = with_client(agent, scenario)
    spec = Spec(DOCS / "openapi-agent.yaml")
    auth = {"Authorization": f"Bearer {agent.token}"}
    with httpx.Client(base_url=agent.url, headers=auth, timeout=30) as api:
        params = {"changed_since": start, "status": "SUCCEEDED"}
        answer = spec.check(api.get("/jobs", params=params), 200).json()
        assert [info["job_id"] for info in answer["jobs"]] == [ended_id]
        again = spec.check(api.get("/jobs", params={"changed_since": answer["cursor"]}), 200).json()
        assert again == {"jobs": [], "cursor": answer["cursor"], "full": False}  # the running one too
    with_client(agent, lambda client: client.stop(running_id, force=True))


# ------------------------------------------------------------------------------ an older agent


@pytest.mark.fast
def test_an_agent_that_predates_change_reads_raises_changes_unsupported() -> None:
    async def todays_list(request: web.Request) -> web.Response:  # ignores changed_since
        return web.json_response({"jobs": []})

    error = against_fake(todays_list, lambda client: client.changed_since("abc.1"))
    assert isinstance(error, ChangesUnsupported) and "predates" in str(error)


@pytest.mark.fast
def test_a_change_read_with_a_garbled_cursor_is_agent_unavailable() -> None:
    async def garbled(request: web.Request) -> web.Response:
        return web.json_response({"jobs": [], "cursor": "no spaces allowed", "full": False})

    error = against_fake(garbled, lambda client: client.changed_since(None))
    assert isinstance(error, AgentUnavailable) and "cursor" in str(error)


@pytest.mark.fast
def test_a_cursor_that_is_no_cursor_is_refused_before_any_request() -> None:
    async def main() -> None:
        async with AgentClient("http://127.0.0.1:9", "t") as client:
            for bad in ("", "a/b", "x" * 65):
                with pytest.raises(ValueError, match="cursor"):
                    await client.changed_since(bad)

    asyncio.run(main())
