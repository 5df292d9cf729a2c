"""The targeted read (the default strategy) with scripted Airflow answers; router DB and dispatcher real.

The scripted Airflow filters like the batch endpoint: by the cross product of the DAG, run and task
id lists, then by state, and counts the same way. What a real Airflow answers to these reads is
covered by the end-to-end tests on Airflow 3.3.2, 3.1.8 and 2.11.2 (tests/test_airflow_e2e.py).
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import pytest

from harness.scripted import ScriptedAirflow, ti
from reconciler.agents import AgentPool
from reconciler.airflow import TaskInstance
from reconciler.config import PollConfig, StopConfig
from reconciler.loop import ReconcileLoop
from reconciler.metrics import Metrics
from reconciler.stops import StopDispatcher
from reconciler.targeted import split
from router_db import JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey
from tests.test_loop import run

T = TypeVar("T")
IN_FLIGHT = "batch:None,scheduled,queued,running,up_for_retry,up_for_reschedule,restarting"
DEFERRED_COUNT = "count:deferred"


def job_at(
    db: RouterDB, run_id: str = "r", task_id: str = "t", dag_id: str = "d", map_index: int = -1
) -> JobRecord:
    ti_key = TaskInstanceKey(dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index)
    job, _ = db.submit(NewJob(ti_key, "agent-1", "sleep 60"))
    return db.mark_running(job.job_id, source="test")


def many_jobs(db: RouterDB, keys: list[tuple[str, str, str]]) -> list[JobRecord]:
    """Running jobs at (dag, run, task) ``keys``, imported in one transaction, in that order."""
    new = [NewJob(TaskInstanceKey(dag_id=d, run_id=r, task_id=t), "agent-1", "sleep 60") for d, r, t in keys]
    ids = db.import_running(new, source="test")
    records = db.get_many(ids)
    return [records[job_id] for job_id in ids]


def key(job: JobRecord) -> tuple[str, str, str, int]:
    k = job.key
    return (k.dag_id, k.run_id, k.task_id, k.map_index)


def deferred(*jobs: JobRecord) -> ScriptedAirflow:
    return ScriptedAirflow(truth={key(j): ti(j, "deferred") for j in jobs})


def make_loop(
    db: RouterDB, airflow: ScriptedAirflow, pool: AgentPool, metrics: Metrics | None = None, **poll: float
) -> tuple[ReconcileLoop, StopDispatcher]:
    metrics = metrics or Metrics()
    dispatcher = StopDispatcher(db, pool, metrics, StopConfig(attempts=1, backoff_initial_seconds=0.01))
    config = PollConfig(**{"full_resync_seconds": 3600.0, "agent_sync_per_cycle": 0, **poll})  # type: ignore[arg-type]
    assert config.strategy == "targeted"  # the default
    loop = ReconcileLoop(
        db=db, airflow=airflow, agents=pool, dispatcher=dispatcher, metrics=metrics, poll=config
    )
    return loop, dispatcher


def status(db: RouterDB, job: JobRecord) -> JobStatus:
    record = db.get(job.job_id)
    assert record is not None
    return record.status


@pytest.mark.fast
def test_a_steady_cycle_is_two_requests_and_no_rows(db: RouterDB) -> None:
    jobs = [job_at(db, task_id=f"t{i}") for i in range(20)]
    airflow = deferred(*jobs)

    async def scenario(pool: AgentPool) -> list[str]:
        loop, _ = make_loop(db, airflow, pool)
        first = await loop.cycle()  # the rolling full check starts with the first cycle
        assert first.read == "targeted+check"
        airflow.calls.clear()
        reads = [(await loop.cycle()).read for _ in range(3)]
        assert reads == ["targeted"] * 3
        return airflow.calls

    calls = run(scenario)
    assert sorted(calls) == sorted([IN_FLIGHT, DEFERRED_COUNT] * 3)
    assert all(status(db, j) is JobStatus.RUNNING for j in jobs)


@pytest.mark.fast
@pytest.mark.parametrize("state", ["failed", "success", "skipped", "upstream_failed", "removed"])
def test_a_task_marked_finished_is_located_by_the_count_and_stopped(db: RouterDB, state: str) -> None:
    jobs = [job_at(db, run_id=f"r{i // 10}", task_id=f"t{i % 10}") for i in range(40)]
    airflow = deferred(*jobs)
    marked = jobs[17]

    async def scenario(pool: AgentPool) -> str:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(marked)] = ti(marked, state)
        airflow.calls.clear()
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [marked.job_id]
        return report.read

    assert run(scenario) == "targeted+locate"
    assert status(db, marked) in (JobStatus.STOPPING, JobStatus.FAILED, JobStatus.SUCCEEDED)
    assert sum(status(db, j) is JobStatus.RUNNING for j in jobs) == 39


@pytest.mark.fast
@pytest.mark.parametrize("state", [None, "up_for_retry", "restarting"])
def test_a_cleared_task_shows_in_flight_and_is_stopped_without_locating(
    db: RouterDB, state: str | None
) -> None:
    jobs = [job_at(db, task_id=f"t{i}") for i in range(5)]
    airflow = deferred(*jobs)

    async def scenario(pool: AgentPool) -> str:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(jobs[2])] = ti(jobs[2], state)
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [jobs[2].job_id]
        return report.read

    assert run(scenario) == "targeted"


@pytest.mark.fast
def test_a_deleted_run_is_located_and_stopped(db: RouterDB) -> None:
    kept, gone = job_at(db, run_id="kept"), job_at(db, run_id="gone")
    airflow = deferred(kept, gone)

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(gone)] = None
        report = await loop.cycle()
        assert [(j.job_id, stop.kind) for j, stop in report.stops] == [(gone.job_id, "ti_absent")]

    run(scenario)
    assert status(db, kept) is JobStatus.RUNNING


@pytest.mark.fast
@pytest.mark.parametrize("path", [["scheduled", "running", "success"], ["success"]])
def test_a_job_that_ended_on_its_own_is_not_taken_for_a_divergence(db: RouterDB, path: list[str]) -> None:
    """The job's end is recorded first; its task instance leaves deferred a moment later, when the
    trigger fires, and resumes (scheduled, running) before it ends. That drop is expected: no stop,
    no direct read, and no locating unless Airflow moved it on faster than a cycle saw."""
    done, other = job_at(db, map_index=0), job_at(db, map_index=1)  # one mapped task's instances
    airflow = deferred(done, other)

    async def scenario(pool: AgentPool) -> tuple[list[str], list[str]]:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        await loop.cycle()
        db.finish(done.job_id, status=JobStatus.SUCCEEDED, rc=0, reason=None, source="agent")
        assert (await loop.cycle()).read == "targeted"  # ended; its TI still deferred
        airflow.calls.clear()
        reads = []
        for state in [*path, "success"]:
            airflow.truth[key(done)] = ti(done, state)
            report = await loop.cycle()
            assert not report.stops
            reads.append(report.read)
        return reads, airflow.calls

    reads, calls = run(scenario)
    assert "direct" not in calls
    assert reads.count("targeted+locate") <= (1 if path == ["success"] else 0)
    assert status(db, other) is JobStatus.RUNNING


@pytest.mark.fast
def test_a_job_ending_on_its_own_does_not_hide_a_marked_one(db: RouterDB) -> None:
    """A finished job's task instance stays deferred until its trigger fires: counted as expected,
    it cannot cover the drop of a task marked failed in the same cycle (three instances of one
    mapped task, so the id lists match all three)."""
    done, marked, other = (job_at(db, map_index=i) for i in range(3))
    airflow = deferred(done, marked, other)

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        await loop.cycle()
        db.finish(done.job_id, status=JobStatus.SUCCEEDED, rc=0, reason=None, source="agent")
        airflow.truth[key(marked)] = ti(marked, "failed")
        report = await loop.cycle()
        assert report.read == "targeted+locate"
        assert [j.job_id for j, _ in report.stops] == [marked.job_id]

    run(scenario)
    assert status(db, other) is JobStatus.RUNNING


@pytest.mark.fast
def test_a_drop_hidden_by_an_unwatched_task_is_found_by_the_rolling_full_check(db: RouterDB) -> None:
    """(d, a, t1) and (d, b, t2) are watched; the id lists also match (d, a, t2), deferred and not
    ours. When it defers just as (d, a, t1) is marked failed, the count does not move: the rolling
    full check, which reads rows, finds the stop within full_resync_seconds."""
    watched, partner = job_at(db, run_id="a", task_id="t1"), job_at(db, run_id="b", task_id="t2")
    airflow = deferred(watched, partner)
    stranger = TaskInstance("d", "a", "t2", -1, "scheduled", 1, None)
    airflow.truth[("d", "a", "t2", -1)] = stranger

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool, full_resync_seconds=0.5)
        await loop.cycle()
        airflow.truth[key(watched)] = ti(watched, "failed")
        airflow.truth[("d", "a", "t2", -1)] = TaskInstance("d", "a", "t2", -1, "deferred", 1, None)
        hidden = await loop.cycle()
        assert hidden.read == "targeted" and not hidden.stops  # the count could not tell
        await asyncio.sleep(0.6)
        found = await loop.cycle()
        assert found.read == "targeted+check"
        assert [j.job_id for j, _ in found.stops] == [watched.job_id]

    run(scenario)
    assert status(db, partner) is JobStatus.RUNNING


@pytest.mark.fast
def test_locating_among_many_runs_reads_the_rows_of_few(db: RouterDB) -> None:
    jobs = many_jobs(db, [("d", f"run{i // 10:03d}", f"t{i % 10}") for i in range(2000)])
    airflow = deferred(*jobs)
    marked = [jobs[5], jobs[1234], jobs[1999]]

    async def scenario(pool: AgentPool) -> dict[str, int]:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        for job in marked:
            airflow.truth[key(job)] = ti(job, "failed")
        before = dict(loop.targeted.requests)
        report = await loop.cycle()
        assert sorted(j.job_id for j, _ in report.stops) == sorted(j.job_id for j in marked)
        return {k: n - before[k] for k, n in loop.targeted.requests.items()}

    requests = run(scenario)
    # 2000 task instances in 200 runs: counts narrow it to three groups of a few runs each.
    assert requests["locate_count"] >= 8
    assert 1 <= requests["rows"] <= 6
    assert sum(status(db, j) is JobStatus.RUNNING for j in jobs) == 1997


@pytest.mark.fast
def test_a_dense_burst_is_read_in_one_request_without_counting_groups(db: RouterDB) -> None:
    jobs = many_jobs(db, [("d", f"run{i // 10:03d}", f"t{i % 10}") for i in range(2000)])
    airflow = deferred(*jobs)
    marked = jobs[::7]  # 286 jobs in every run of 200: most runs hold part of the drop

    async def scenario(pool: AgentPool) -> dict[str, int]:
        loop, dispatcher = make_loop(db, airflow, pool)
        await loop.cycle()
        for job in marked:
            airflow.truth[key(job)] = ti(job, "success")
        before = dict(loop.targeted.requests)
        report = await loop.cycle()
        assert sorted(j.job_id for j, _ in report.stops) == sorted(j.job_id for j in marked)
        await dispatcher.drain(10)  # the stops under way, before the agent pool closes
        return {k: n - before[k] for k, n in loop.targeted.requests.items()}

    assert run(scenario) == {"in_flight": 1, "deferred_count": 1, "locate_count": 0, "rows": 1}


@pytest.mark.fast
def test_a_deleted_run_among_many_is_found_by_reading_its_group_row_by_row(db: RouterDB) -> None:
    """Finished rows cannot show a vanished run: when they do not make up the drop, every row of the
    group is read, and the watched keys Airflow does not return are absent."""
    jobs = many_jobs(db, [("d", f"run{i // 10:03d}", f"t{i % 10}") for i in range(2000)])
    airflow = deferred(*jobs)
    gone = [j for j in jobs if j.key.run_id == "run123"]

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        for job in gone:
            airflow.truth[key(job)] = None
        report = await loop.cycle()
        assert sorted((j.job_id, stop.kind) for j, stop in report.stops) == sorted(
            (j.job_id, "ti_absent") for j in gone
        )

    run(scenario)
    assert sum(status(db, j) is JobStatus.RUNNING for j in jobs) == 1990


@pytest.mark.fast
def test_airflow_errors_keep_every_job(db: RouterDB) -> None:
    job = job_at(db)
    airflow = deferred(job)

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(job)] = ti(job, "failed")
        airflow.fail_lists = True  # every list read answers 500
        assert (await loop.cycle()).result == "airflow_error"
        airflow.fail_lists, airflow.fail_direct = False, True
        report = await loop.cycle()  # located, but the confirming read fails: kept
        assert report.result == "ok" and not report.stops and report.unconfirmed == 1

    run(scenario)
    assert status(db, job) is JobStatus.RUNNING


@pytest.mark.fast
def test_a_refused_batch_read_falls_back_to_incremental_reads_and_comes_back(db: RouterDB) -> None:
    """Airflow 2's batch endpoint answers 403 to a whole request that names one DAG the user may
    not read (a proxy, 413 to a large body): the cycle reads what changed instead, so a task marked
    failed is still stopped, and the targeted read is tried again after a backoff."""
    marked, other = job_at(db, task_id="marked"), job_at(db, task_id="other")
    airflow = deferred(marked, other)

    async def scenario(pool: AgentPool) -> list[str]:
        loop, _ = make_loop(db, airflow, pool, interval_seconds=0.1)
        await loop.cycle()
        airflow.fail_batch = True
        airflow.truth[key(marked)] = ti(marked, "failed")
        airflow.listed = [ti(marked, "failed")]  # what changed since the last read
        report = await loop.cycle()
        assert report.read == "incremental (targeted read refused)"
        assert [j.job_id for j, _ in report.stops] == [marked.job_id]
        assert loop.full_read_error is not None and "403" in loop.full_read_error
        airflow.fail_batch, airflow.listed = False, None
        await asyncio.sleep(0.25)  # past the backoff (one interval, then two)
        reads = [(await loop.cycle()).read for _ in range(2)]
        assert loop.full_read_error is None
        return reads

    assert run(scenario)[-1] == "targeted"
    assert status(db, other) is JobStatus.RUNNING


@pytest.mark.fast
def test_no_jobs_means_a_ping_only(db: RouterDB) -> None:
    airflow = ScriptedAirflow()

    async def scenario(pool: AgentPool) -> list[str]:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        return airflow.calls

    assert run(scenario) == ["ping"]


@pytest.mark.fast
def test_split_keeps_order_and_covers_everything() -> None:
    items = list(range(17))
    parts = split(items, 8)
    assert [x for part in parts for x in part] == items
    assert len(parts) <= 8 and max(map(len, parts)) - min(map(len, parts)) <= 2


@pytest.mark.fast
def test_a_drop_in_dags_that_share_run_ids_is_located_in_the_next_cycle(db: RouterDB) -> None:
    """Two DAGs on one schedule have the same run ids: a group of A's runs with a few of B's counts
    B's deferred task instances of A's run ids too. Those are expected there, so the group's own
    drop still shows."""
    jobs = many_jobs(
        db,
        [
            (dag, f"scheduled__{n:03d}", task)
            for dag in ("a", "b")
            for n in range(150)
            for task in ("t0", "t1")
        ],
    )
    airflow = deferred(*jobs)
    marked = next(
        j for j in jobs if (j.key.dag_id, j.key.run_id, j.key.task_id) == ("b", "scheduled__000", "t0")
    )

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(marked)] = ti(marked, "failed")
        report = await loop.cycle()
        assert report.read == "targeted+locate"
        assert [j.job_id for j, _ in report.stops] == [marked.job_id]

    run(scenario)


@pytest.mark.fast
def test_requests_in_flight_never_exceed_max_concurrent_reads(db: RouterDB) -> None:
    jobs = many_jobs(db, [("d", f"run{i // 2:04d}", f"t{i % 2}") for i in range(6000)])
    airflow = deferred(*jobs)
    airflow.latency = 0.002
    marked = jobs[::97]

    async def scenario(pool: AgentPool) -> None:
        loop, dispatcher = make_loop(db, airflow, pool, max_concurrent_reads=3)
        await loop.cycle()
        for job in marked:
            airflow.truth[key(job)] = ti(job, "failed")
        report = await loop.cycle()
        assert sorted(j.job_id for j, _ in report.stops) == sorted(j.job_id for j in marked)
        await dispatcher.drain(10)  # the stops under way, before the agent pool closes

    run(scenario)
    assert 1 < airflow.peak_in_flight <= 3


@pytest.mark.fast
def test_a_failing_locate_keeps_what_the_other_reads_found_and_is_tried_again(db: RouterDB) -> None:
    marked, cleared, other = (job_at(db, task_id=t) for t in ("marked", "cleared", "other"))
    airflow = deferred(marked, cleared, other)

    async def scenario(pool: AgentPool) -> None:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(marked)] = ti(marked, "failed")
        airflow.truth[key(cleared)] = ti(cleared, None)
        airflow.fail_states = {"success"}  # every read of finished rows answers 500
        report = await loop.cycle()
        assert report.result == "ok" and report.read == "targeted+locate (1 failed)"
        assert [j.job_id for j, _ in report.stops] == [cleared.job_id]  # seen in flight
        airflow.fail_states = set()
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [marked.job_id]

    run(scenario)
    assert status(db, other) is JobStatus.RUNNING


@pytest.mark.fast
def test_a_terms_first_cycles_check_every_run_so_a_hidden_drop_from_before_is_found_at_once(
    db: RouterDB,
) -> None:
    """What happened while no sidecar led (it was down, or another replica was) and the count cannot
    see is found within a term's first cycles: they read every run's rows, two thousand a cycle."""
    watched, partner = job_at(db, run_id="a", task_id="t1"), job_at(db, run_id="b", task_id="t2")
    others = many_jobs(db, [("d", f"r{i:04d}", "t1") for i in range(2500)])
    airflow = deferred(watched, partner, *others)
    airflow.truth[key(watched)] = ti(watched, "failed")
    airflow.truth[("d", "a", "t2", -1)] = TaskInstance("d", "a", "t2", -1, "deferred", 1, None)

    async def scenario(pool: AgentPool) -> list[int]:
        loop, _ = make_loop(db, airflow, pool)
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [watched.job_id]
        rows = [loop.targeted.requests["rows"]]
        for _ in range(3):
            await loop.cycle()
            rows.append(loop.targeted.requests["rows"])
        return rows

    # 2,502 task instances, a thousand a request: two requests, one, then the round is done.
    assert run(scenario) == [2, 3, 3, 3]


@pytest.mark.fast
def test_deferred_task_instances_beyond_the_watched_ones_are_exported_as_a_surplus(db: RouterDB) -> None:
    """An unwatched deferred task instance the id lists match can cover a drop until the full check:
    the count's surplus says how many, so the person on call can see the count is blind to as many."""
    one, two = job_at(db, run_id="a", task_id="t1"), job_at(db, run_id="b", task_id="t2")
    airflow = deferred(one, two)

    metrics = Metrics()

    def surplus() -> str:
        line = next(
            x for x in metrics.render().decode().splitlines() if x.startswith("reconciler_targeted_count_")
        )
        return line.split()[-1]

    async def scenario(pool: AgentPool) -> list[str]:
        loop, _ = make_loop(db, airflow, pool, metrics=metrics)
        await loop.cycle()
        seen = [surplus()]
        airflow.truth[("d", "a", "t2", -1)] = TaskInstance("d", "a", "t2", -1, "deferred", 1, None)
        await loop.cycle()
        return [*seen, surplus()]

    assert run(scenario) == ["0.0", "1.0"]
