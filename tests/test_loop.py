"""The poll loop with scripted Airflow answers; router DB, dispatcher and agent are real.

Airflow's answers are scripted here because the behaviour under test is the loop's own: which read
it makes when, what it does with errors and garbage, and that it never stops on uncertainty. The
same loop against a real Airflow is covered by tests/test_airflow_e2e.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.scripted import ScriptedAirflow, ti
from harness.wiring import nobody_waits
from reconciler.airflow.task_instances import TaskInstance
from reconciler.config import AgentEntry, PollConfig, StopConfig
from reconciler.core.loop import ReconcileLoop
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey

T = TypeVar("T")


def running_job(
    db: RouterDB, task_id: str = "t", try_number: int = 1, agent_id: str = "agent-1"
) -> JobRecord:
    job, _ = db.submit(
        NewJob(
            TaskInstanceKey(dag_id="d", task_id=task_id, run_id="r", map_index=-1, try_number=try_number),
            agent_id,
            "sleep 60",
        )
    )
    return db.mark_running(job.job_id, source="test")


def make_loop(
    db: RouterDB, airflow: ScriptedAirflow, agents: AgentPool, **poll: float | str
) -> tuple[ReconcileLoop, StopDispatcher]:
    metrics = Metrics()
    dispatcher = StopDispatcher(
        db, agents, metrics, StopConfig(attempts=1, backoff_initial_seconds=0.01), changed=nobody_waits
    )
    # These tests pin the incremental strategy's reads; tests/test_targeted.py covers the default.
    settings = {"strategy": "incremental", "full_resync_seconds": 3600.0, "agent_sync_per_cycle": 0, **poll}
    config = PollConfig(**settings)  # type: ignore[arg-type]
    return build_core(
        db=db, airflow=airflow, agents=agents, dispatcher=dispatcher, metrics=metrics, poll=config
    ).loop, dispatcher


def unreachable_agents() -> AgentPool:
    entry = AgentEntry(id="agent-1", url=f"http://127.0.0.1:{free_port()}")
    return AgentPool([entry], {"agent-1": "token"}, timeout=1.0, stop_timeout=1.0)


def run(scenario: Callable[[AgentPool], Awaitable[T]]) -> T:
    """Run ``scenario`` with an agent pool that nothing answers, closed before the event loop ends."""

    async def main() -> T:
        pool = unreachable_agents()
        try:
            return await scenario(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


@pytest.mark.fast
@pytest.mark.parametrize(("strategy", "reloads"), [("batch", 3), ("incremental", 1), ("targeted", 1)])
def test_batch_reads_the_active_jobs_whole_every_cycle_the_others_what_changed(
    db: RouterDB, monkeypatch: pytest.MonkeyPatch, strategy: str, reloads: int
) -> None:
    """``batch`` reads everything every cycle, the router DB's active jobs too; the other strategies
    reload them every full_resync_seconds and read what changed in between."""
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")})
    calls: list[str] = []
    active = db.active
    monkeypatch.setattr(db, "active", lambda *a, **k: calls.append("active") or active(*a, **k))

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, strategy=strategy)
        for _ in range(3):
            assert (await loop.cycle()).result == "ok"

    run(scenario)
    assert calls.count("active") == reloads


@pytest.mark.fast
def test_first_cycle_reads_everything_then_only_what_changed(db: RouterDB) -> None:
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")})

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, overlap_seconds=10.0)
        before = datetime.now(UTC)
        assert (await loop.cycle()).read == "full"
        assert (await loop.cycle()).read == "incremental"
        assert (await loop.cycle()).read == "incremental"
        assert airflow.calls == ["batch", "changed_since", "changed_since"]
        # Each incremental read starts the overlap before the previous read began.
        assert before - timedelta(seconds=10) <= airflow.since[0] <= datetime.now(UTC) - timedelta(seconds=10)
        assert airflow.since[1] > airflow.since[0]

    run(scenario)
    assert db.get(job.job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]


@pytest.mark.fast
def test_failed_incremental_read_does_not_advance_the_watermark(db: RouterDB) -> None:
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")})

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        await loop.cycle()
        airflow.fail_lists = True
        assert (await loop.cycle()).result == "airflow_error"
        airflow.fail_lists = False
        await loop.cycle()
        # The read after the outage starts where the failed one would have: nothing in between is skipped.
        assert airflow.since[2] == airflow.since[1]

    run(scenario)


@pytest.mark.fast
def test_full_resync_runs_again_after_its_interval(db: RouterDB) -> None:
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")})

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, full_resync_seconds=0.2)
        await loop.cycle()
        await loop.cycle()
        await asyncio.sleep(0.25)
        assert (await loop.cycle()).read == "full"

    run(scenario)
    assert airflow.calls.count("batch") == 2


@pytest.mark.fast
def test_the_full_read_checks_every_job_of_a_task_instance(db: RouterDB) -> None:
    # Two live jobs of one task instance: the old try's job must go, whichever the read meets first.
    old = running_job(db, "t", try_number=1)
    new = running_job(db, "t", try_number=2)
    gone_old, gone_new = running_job(db, "deleted", try_number=1), running_job(db, "deleted", try_number=2)
    airflow = ScriptedAirflow(
        truth={("d", "r", "t", -1): ti(new, "running"), ("d", "r", "deleted", -1): None}
    )

    async def scenario(pool: AgentPool) -> set[str]:
        loop, _ = make_loop(db, airflow, pool)
        report = await loop.cycle(dry_run=True)
        assert report.read == "full"
        return {job.job_id for job, _ in report.stops}

    assert run(scenario) == {old.job_id, gone_old.job_id, gone_new.job_id}


@pytest.mark.fast
def test_a_failing_full_read_backs_off_and_incremental_reads_go_on(db: RouterDB) -> None:
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")})

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, full_resync_seconds=0.01, interval_seconds=0.5)
        await loop.cycle()  # the first full read works
        airflow.fail_batch = True
        await asyncio.sleep(0.02)
        report = await loop.cycle()  # full read due, and failing: this cycle still reads incrementally
        assert report.read == "incremental (full read failing)" and report.result == "ok"
        assert loop.read.failing == "HTTP 403"
        assert loop._metrics.full_resync_failing._value.get() == 1
        airflow.truth[("d", "r", "t", -1)] = ti(job, "failed")  # a person marks the task failed
        report = await loop.cycle()
        assert report.read == "incremental (full read failing)"
        assert [j.job_id for j, _ in report.stops] == [job.job_id]
        assert airflow.calls.count("batch") == 2  # backing off: not retried every cycle
        await asyncio.sleep(1.05)  # past the backoff (2 x interval): the full read is tried again
        airflow.fail_batch = False
        assert (await loop.cycle()).read == "full"
        assert loop.read.failing is None and loop._metrics.full_resync_failing._value.get() == 0

    run(scenario)


@pytest.mark.fast
def test_batch_tries_its_full_read_again_the_next_cycle(db: RouterDB) -> None:
    """batch reads everything every cycle: a failed full read is not backed off. Between full reads it
    would depend on the changed-since read, which a clock of this host ahead of Airflow's by more than
    overlap_seconds blinds (the simulation's world 435: stops 4 s late after an outage)."""
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")})

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, strategy="batch", interval_seconds=5.0)
        assert (await loop.cycle()).read == "full"
        airflow.fail_batch = True
        assert (await loop.cycle()).read == "incremental (full read failing)"
        airflow.fail_batch = False
        airflow.truth[("d", "r", "t", -1)] = ti(job, "failed")
        report = await loop.cycle()
        assert report.read == "full" and [j.job_id for j, _ in report.stops] == [job.job_id]

    run(scenario)


@pytest.mark.fast
def test_a_full_read_failing_from_the_start_does_not_block_incremental_reads(db: RouterDB) -> None:
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")}, fail_batch=True)

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, interval_seconds=5.0)
        assert (await loop.cycle()).result == "airflow_error"
        airflow.truth[("d", "r", "t", -1)] = ti(job, "failed")
        report = await loop.cycle()
        assert report.read == "incremental (full read failing)"
        assert [j.job_id for j, _ in report.stops] == [job.job_id]

    run(scenario)


@pytest.mark.fast
def test_a_job_of_a_deleted_run_is_stopped_when_the_run_is_created_again(db: RouterDB) -> None:
    # The run was deleted and triggered again with the same run_id: same key, same try, another task
    # instance. The old job must go; the new run's job (its own identity) stays.
    old, _ = db.submit(
        NewJob(
            TaskInstanceKey(dag_id="d", task_id="t", run_id="r", map_index=-1, try_number=1),
            "agent-1",
            "sleep 60",
            "ti-old",
        )
    )
    new, _ = db.submit(
        NewJob(
            TaskInstanceKey(dag_id="d", task_id="t", run_id="r", map_index=-1, try_number=1),
            "agent-1",
            "sleep 60",
            "ti-new",
        )
    )
    for job in (old, new):
        db.mark_running(job.job_id, source="test")
    now_running = TaskInstance("d", "r", "t", -1, "deferred", 1, None, "ti-new")
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): now_running})

    async def scenario(pool: AgentPool) -> list[tuple[str, str]]:
        loop, _ = make_loop(db, airflow, pool)
        full = await loop.cycle(dry_run=True)
        incremental = await loop.cycle(dry_run=True)
        assert (full.read, incremental.read) == ("full", "incremental")
        return [(j.job_id, str(stop.kind)) for report in (full, incremental) for j, stop in report.stops]

    assert run(scenario) == [(old.job_id, "ti_replaced")] * 2


@pytest.mark.fast
def test_absent_in_a_full_read_stops_only_once_a_direct_read_confirms(db: RouterDB) -> None:
    deleted = running_job(db, "deleted")
    lagging = running_job(db, "lagging")
    airflow = ScriptedAirflow(
        truth={("d", "r", "deleted", -1): None, ("d", "r", "lagging", -1): ti(lagging, "deferred")},
        listed=[],  # the batch read sees neither
    )

    async def scenario(pool: AgentPool) -> list[JobRecord]:
        loop, _ = make_loop(db, airflow, pool)
        report = await loop.cycle(dry_run=True)
        return [job for job, _ in report.stops]

    stopped = run(scenario)
    assert [j.job_id for j in stopped] == [deleted.job_id]
    assert airflow.calls.count("direct") == 2


@pytest.mark.fast
def test_a_task_missing_from_an_incremental_read_is_left_alone(db: RouterDB) -> None:
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "deferred")})

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth = {}  # deleted: only a full resync may conclude that
        airflow.listed = []
        report = await loop.cycle()
        assert report.read == "incremental" and not report.stops

    run(scenario)
    assert "direct" not in airflow.calls


@pytest.mark.fast
def test_dry_run_decides_but_changes_nothing(db: RouterDB) -> None:
    job = running_job(db)
    airflow = ScriptedAirflow(truth={("d", "r", "t", -1): ti(job, "failed")})

    async def scenario(pool: AgentPool) -> int:
        loop, _ = make_loop(db, airflow, pool)
        return len((await loop.cycle(dry_run=True)).stops)

    assert run(scenario) == 1
    assert db.get(job.job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    assert len(db.events(job.job_id)) == 2


def test_a_restarted_reconciler_finishes_a_stop_left_pending(db: RouterDB, tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="t0ken") as agent:
        job, _ = db.submit(
            NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-1", "sleep 60")
        )
        pool = AgentPool([AgentEntry("agent-1", agent.url)], {"agent-1": "t0ken"}, timeout=5, stop_timeout=30)

        async def scenario() -> None:
            try:
                await pool.client("agent-1").run(job.job_id, {"command": "sleep 60"})
                # The previous reconciler recorded the intent and died before calling the agent.
                db.mark_running(job.job_id, source="submit")
                db.request_stop(
                    job.job_id,
                    stop_status=JobStatus.FAILED,
                    reason="task instance is failed",
                    source="reconciler",
                )
                loop, dispatcher = make_loop(db, ScriptedAirflow(), pool)
                await loop.cycle()
                await dispatcher.finish(30)
            finally:
                await pool.close()

        asyncio.run(scenario())
        done = db.get(job.job_id)
        assert done is not None and done.status is JobStatus.FAILED and done.rc is not None and done.rc < 0
        assert [e.new_status for e in db.events(job.job_id)][-2:] == [JobStatus.STOPPING, JobStatus.FAILED]


# --- the property: nothing stops a job whose task instance really runs on the job's own try -------

STATES = st.sampled_from(
    [
        None,
        "running",
        "deferred",
        "queued",
        "scheduled",
        "success",
        "failed",
        "upstream_failed",
        "skipped",
        "removed",
        "restarting",
        "up_for_retry",
        "up_for_reschedule",
        "some_future_state",
    ]
)
LIST_ANSWER = st.one_of(
    st.just("error"),
    st.just("absent"),
    st.tuples(STATES, st.integers(min_value=0, max_value=5)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    own_state=st.sampled_from(["running", "deferred"]),
    script=st.lists(st.tuples(LIST_ANSWER, st.booleans(), st.booleans()), min_size=1, max_size=8),
)
@pytest.mark.fast
def test_no_sequence_of_observations_stops_a_job_whose_task_runs_on_its_own_try(
    db: RouterDB, own_state: str, script: list[tuple[object, bool, bool]]
) -> None:
    """Whatever list reads say (stale, wrong try, absent, garbage-as-error), and whether direct reads
    fail or not, a job whose task instance is truly running or deferred on its try is never stopped."""
    job = running_job(db, task_id=f"t{uuid.uuid4().hex[:12]}", try_number=2)
    truth = ti(job, own_state)
    airflow = ScriptedAirflow(truth={ti_key_of(job): truth})

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, full_resync_seconds=0.0)
        for list_answer, direct_fails, force_full in script:
            airflow.fail_lists = list_answer == "error"
            airflow.fail_direct = direct_fails
            if list_answer == "absent":
                airflow.listed = []
            elif isinstance(list_answer, tuple):
                state, try_number = list_answer
                airflow.listed = [ti(job, state, try_number)]
            if force_full:
                loop.jobs._next_reload = float("-inf")
            await loop.cycle()

    run(scenario)
    after = db.get(job.job_id)
    assert after is not None and after.status is JobStatus.RUNNING
    assert all(e.new_status is not JobStatus.STOPPING for e in db.events(job.job_id))
    # Examples share the DB: retire this job so the next example's reads do not see it.
    db.finish(job.job_id, status=JobStatus.FAILED, rc=None, reason="example over", source="test")


def ti_key_of(job: JobRecord) -> tuple[str, str, str, int]:
    return (job.key.dag_id, job.key.run_id, job.key.task_id, job.key.map_index)


def test_exits_nobody_reported_are_recorded_by_the_next_cycle(db: RouterDB, tmp_path: Path) -> None:
    """The agent's catch-up read (one request per agent per cycle) finds every exit at once; agents
    without it get the rolling sweep of agent_sync_per_cycle jobs (tests/test_catch_up.py)."""
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="t0ken") as agent:
        pool = AgentPool([AgentEntry("agent-1", agent.url)], {"agent-1": "t0ken"}, timeout=5, stop_timeout=30)
        jobs = [running_job(db, task_id=f"t{i}") for i in range(5)]
        airflow = ScriptedAirflow(truth={("d", "r", j.key.task_id, -1): ti(j, "deferred") for j in jobs})

        async def scenario() -> list[int]:
            try:
                for job in jobs:
                    await pool.client("agent-1").run(job.job_id, {"command": "exit 0"})
                await asyncio.sleep(1.0)  # every job has exited; the router DB still says RUNNING
                loop, _ = make_loop(db, airflow, pool, agent_sync_per_cycle=2)
                still_running = []
                for _ in range(3):
                    await loop.cycle()
                    still_running.append(sum(db.get(j.job_id).status is JobStatus.RUNNING for j in jobs))  # type: ignore[union-attr]
                return still_running
            finally:
                await pool.close()

        assert asyncio.run(scenario()) == [0, 0, 0]
    assert all(db.get(j.job_id).rc == 0 for j in jobs)  # type: ignore[union-attr]


def test_a_stop_pending_past_its_deadline_is_sent_with_force(db: RouterDB, tmp_path: Path) -> None:
    # A job that ignores SIGTERM on an agent with a long grace period: only force (SIGKILL at once)
    # can end it quickly.
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="t0ken", grace_seconds=60) as agent:
        pool = AgentPool([AgentEntry("agent-1", agent.url)], {"agent-1": "t0ken"}, timeout=5, stop_timeout=90)
        job, _ = db.submit(
            NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-1", "trap '' TERM; sleep 60")
        )

        async def scenario() -> float:
            try:
                await pool.client("agent-1").run(job.job_id, {"command": "trap '' TERM; sleep 60"})
                await asyncio.sleep(0.5)
                db.mark_running(job.job_id, source="submit")
                db.request_stop(
                    job.job_id, stop_status=JobStatus.FAILED, reason="task instance is failed", source="t"
                )
                metrics = Metrics()
                config = StopConfig(attempts=1, force_after_seconds=0.1)  # the intent is already overdue
                dispatcher = StopDispatcher(db, pool, metrics, config, changed=nobody_waits)
                await asyncio.sleep(0.2)
                started = time.monotonic()
                dispatcher.resume(db.get(job.job_id))  # type: ignore[arg-type]
                await dispatcher.finish(30)
                return time.monotonic() - started
            finally:
                await pool.close()

        took = asyncio.run(scenario())
    done = db.get(job.job_id)
    assert done is not None and done.status is JobStatus.FAILED and done.rc == -9
    assert took < 10, f"force was not used: the stop waited {took:.1f} s"
