"""The loop's catch-up with agents: one change-feed request per agent per cycle, whatever the number
of its jobs, recording exits with their rc; agents without the feed keep the rolling per-job sweep.

What a report means is pinned by :func:`reconciler.core.agent_reports.plan` (pure); the loop is then run
against stand-in agents that count what they are asked (in process, through the loop's real agent
pool interface), and against a real agent process.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from agent_api.client import AgentClient, ChangesUnsupported, JobNotFound, StopResult
from agent_api.protocol import AgentJobStatus, JobInfo, StopAction
from harness.agent import AgentProcess
from harness.scripted import ScriptedAirflow, ti
from harness.wiring import nobody_waits
from reconciler.config import AgentEntry, PollConfig, StopConfig
from reconciler.core.agent_reports import plan
from reconciler.core.loop import ReconcileLoop
from reconciler.core.outcome import START_GRACE_SECONDS
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey, Transition

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def record(job_id: str, status: JobStatus, *, agent_id: str = "a1", age: float = 10.0) -> JobRecord:
    created = NOW - timedelta(seconds=age)
    return JobRecord(
        job_id, TaskInstanceKey(dag_id="d", task_id=job_id, run_id="r"), agent_id, "true", status,
        None, None, None, created, created, None, None,
    )  # fmt: skip


def info(job_id: str, status: AgentJobStatus, rc: int | None = None) -> JobInfo:
    return JobInfo(job_id, status, 1, rc, NOW, NOW if rc is not None else None, None)


# --- what a report means ---------------------------------------------------------------------------


@pytest.mark.fast
def test_reported_exits_end_jobs_with_their_rc_and_starts_mark_them_running() -> None:
    records = {
        "ok": record("ok", JobStatus.RUNNING),
        "bad": record("bad", JobStatus.RUNNING),
        "started": record("started", JobStatus.QUEUED),
        "same": record("same", JobStatus.RUNNING),
        "stopping": record("stopping", JobStatus.STOPPING),  # only the stop path ends it
        "other": record("other", JobStatus.RUNNING, agent_id="a2"),  # not this agent's job
    }
    reports = [
        info("ok", AgentJobStatus.SUCCEEDED, 0),
        info("bad", AgentJobStatus.FAILED, 3),
        info("started", AgentJobStatus.RUNNING),
        info("same", AgentJobStatus.RUNNING),
        info("stopping", AgentJobStatus.FAILED, -15),
        info("other", AgentJobStatus.FAILED, 1),
        info("unknown", AgentJobStatus.FAILED, 1),  # a job the router DB does not know
    ]
    result = plan(records, reports, agent_id="a1", full=False, now=NOW)
    assert result.transitions == [
        Transition.finish("ok", JobStatus.SUCCEEDED, 0, "exited with rc 0"),
        Transition.finish("bad", JobStatus.FAILED, 3, "exited with rc 3"),
        Transition.running("started"),
    ]
    assert result.give_up == []


@pytest.mark.fast
def test_a_full_report_gives_up_queued_jobs_it_lacks_past_their_grace_and_keeps_the_rest() -> None:
    old = START_GRACE_SECONDS + 1
    records = {
        "late": record("late", JobStatus.QUEUED, age=old),
        "fresh": record("fresh", JobStatus.QUEUED, age=1),  # its /run may still be on the way
        "running": record("running", JobStatus.RUNNING, age=old),  # the orphan sweep's business
        "reported": record("reported", JobStatus.QUEUED, age=old),
    }
    reports = [info("reported", AgentJobStatus.QUEUED)]
    full = plan(records, reports, agent_id="a1", full=True, now=NOW)
    assert full.transitions == [] and [j.job_id for j in full.give_up] == ["late"]
    partial = plan(records, reports, agent_id="a1", full=False, now=NOW)
    assert partial.transitions == [] and partial.give_up == []


# --- the loop against counting stand-in agents ---------------------------------------------------------


class StandInAgent:
    """Answers the change feed (or refuses it, as an agent that predates it) and single reads from
    ``jobs``; counts every call."""

    def __init__(self, agent_id: str, *, feed: bool = True) -> None:
        self.agent_id = agent_id
        self.feed = feed
        self.jobs: dict[str, JobInfo] = {}
        self.changed: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.cursors: list[str | None] = []

    async def changed_since(self, cursor: str | None) -> tuple[list[JobInfo], str, bool]:
        self.calls["changed_since"] += 1
        self.cursors.append(cursor)
        if not self.feed:
            raise ChangesUnsupported("the agent answers without a cursor")
        full = cursor is None
        shown = list(self.jobs.values()) if full else [self.jobs[j] for j in sorted(self.changed)]
        self.changed.clear()
        return shown, f"c{self.calls['changed_since']}", full

    async def get(self, job_id: str) -> JobInfo:
        self.calls["get"] += 1
        if job_id not in self.jobs:
            raise JobNotFound(404, "unknown job", request="GET")
        return self.jobs[job_id]

    async def stop(self, job_id: str, *, force: bool = False, reason: str = "") -> StopResult:
        self.calls["stop"] += 1
        return StopResult(True, "stopped", AgentJobStatus.FAILED, -15, StopAction.TERMINATED, "SIGTERM", None)

    def exit(self, job_id: str, rc: int) -> None:
        status = AgentJobStatus.SUCCEEDED if rc == 0 else AgentJobStatus.FAILED
        self.jobs[job_id] = info(job_id, status, rc)
        self.changed.add(job_id)


class StandInPool:
    def __init__(self, *agents: StandInAgent) -> None:
        self.agents = {a.agent_id: a for a in agents}

    def client(self, agent_id: str) -> AgentClient:
        return cast(AgentClient, self.agents[agent_id])

    def ids(self) -> list[str]:  # the agents it can address: the loop ends the jobs of any other
        return sorted(self.agents)


def loop_with(db: RouterDB, pool: StandInPool, jobs: list[JobRecord]) -> ReconcileLoop:
    airflow = ScriptedAirflow(truth={("d", "r", j.key.task_id, -1): ti(j, "deferred") for j in jobs})
    agents = cast(AgentPool, pool)
    metrics = Metrics()
    dispatcher = StopDispatcher(db, agents, metrics, StopConfig(attempts=1), changed=nobody_waits)
    poll = PollConfig(strategy="incremental", full_resync_seconds=3600.0, agent_sync_per_cycle=50)
    return build_core(
        db=db, airflow=airflow, agents=agents, dispatcher=dispatcher, metrics=metrics, poll=poll
    ).loop


def running_jobs(db: RouterDB, agent_id: str, count: int) -> list[JobRecord]:
    ids = db.import_running(
        [
            NewJob(TaskInstanceKey(dag_id="d", task_id=f"{agent_id}-t{i}", run_id="r"), agent_id, "sleep 60")
            for i in range(count)
        ],
        source="test",
    )
    return list(db.get_many(ids).values())


@pytest.mark.fast
def test_one_change_feed_request_per_agent_per_cycle_records_every_exit_with_its_rc(db: RouterDB) -> None:
    a1, a2 = StandInAgent("a1"), StandInAgent("a2")
    jobs = {a.agent_id: running_jobs(db, a.agent_id, 300) for a in (a1, a2)}
    for agent in (a1, a2):
        for job in jobs[agent.agent_id]:
            agent.jobs[job.job_id] = info(job.job_id, AgentJobStatus.RUNNING)
    loop = loop_with(db, StandInPool(a1, a2), jobs["a1"] + jobs["a2"])

    async def scenario() -> None:
        await loop.cycle()  # in full: nothing changed
        for i, job in enumerate(jobs["a1"][:40]):
            a1.exit(job.job_id, i % 3)
        a2.exit(jobs["a2"][0].job_id, 9)
        await loop.cycle()
        await loop.cycle()

    asyncio.run(scenario())
    for agent in (a1, a2):
        assert agent.calls == {"changed_since": 3}  # no per-job read, whatever the job count
        assert agent.cursors == [None, "c1", "c2"]  # each ask goes on from the previous answer
    ended = db.get_many([j.job_id for j in jobs["a1"][:40]] + [jobs["a2"][0].job_id])
    assert [(ended[j.job_id].status, ended[j.job_id].rc) for j in jobs["a1"][:3]] == [
        (JobStatus.SUCCEEDED, 0),
        (JobStatus.FAILED, 1),
        (JobStatus.FAILED, 2),
    ]
    assert all(not job.active for job in ended.values())
    assert (ended[jobs["a2"][0].job_id].status, ended[jobs["a2"][0].job_id].rc) == (JobStatus.FAILED, 9)
    assert len(db.active()) == 600 - 41


@pytest.mark.fast
def test_an_agent_without_the_change_feed_keeps_the_rolling_sweep(db: RouterDB) -> None:
    old, new = StandInAgent("old", feed=False), StandInAgent("new")
    jobs = running_jobs(db, "old", 5) + running_jobs(db, "new", 5)
    for job in jobs:
        agent = old if job.agent_id == "old" else new
        agent.jobs[job.job_id] = info(job.job_id, AgentJobStatus.RUNNING)
    for job in jobs[:5]:
        old.exit(job.job_id, 4)
    loop = loop_with(db, StandInPool(old, new), jobs)

    async def scenario() -> None:
        await loop.cycle()
        await loop.cycle()

    asyncio.run(scenario())
    # Asked once; then, until RETRY_UNSUPPORTED_SECONDS pass, only its jobs one by one.
    assert old.calls == {"changed_since": 1, "get": 5}
    assert new.calls == {"changed_since": 2}  # the other agent's jobs are never read one by one
    assert {(j.status, j.rc) for j in db.get_many([j.job_id for j in jobs[:5]]).values()} == {
        (JobStatus.FAILED, 4)
    }


def test_a_real_agent_reports_exits_in_one_request_a_cycle(db: RouterDB, tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="t0ken") as agent:
        pool = AgentPool([AgentEntry("agent-1", agent.url)], {"agent-1": "t0ken"}, timeout=5, stop_timeout=30)
        jobs = running_jobs(db, "agent-1", 5)
        loop = loop_with(db, StandInPool(), jobs)
        loop.sync._agents = pool  # the real pool for the sweep, and for the catch-up:
        loop.sync.catch_up.agents = pool

        async def scenario() -> list[int]:
            try:
                for i, job in enumerate(jobs):
                    await pool.client("agent-1").run(job.job_id, {"command": f"sleep 0.3; exit {i}"})
                running = []
                for _ in range(3):
                    await loop.cycle()
                    running.append(sum(db.get(j.job_id).status is JobStatus.RUNNING for j in jobs))  # type: ignore[union-attr]
                    await asyncio.sleep(1.0)
                return running
            finally:
                await pool.close()

        assert asyncio.run(scenario())[1:] == [0, 0]
    assert [db.get(j.job_id).rc for j in jobs] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
    assert loop.sync.catch_up.cursors.get("agent-1")  # the feed answered: no per-job sweep needed
