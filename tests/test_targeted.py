"""The targeted read (the default strategy) with scripted Airflow answers; router DB and dispatcher real.

The scripted Airflow filters like the batch endpoint: by the cross product of the DAG, run and task
id lists, then by state, and counts the same way. What a real Airflow answers to these reads is
covered by the end-to-end tests on Airflow 3.3.2, 3.1.8 and 2.11.2 (tests/test_airflow_e2e.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import pytest

from harness.scripted import ScriptedAirflow, ti
from harness.wiring import nobody_waits
from reconciler.airflow.task_instances import TaskInstance, TaskInstancePath
from reconciler.config import PollConfig, StopConfig
from reconciler.core.loop import ReconcileLoop
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.core.watched import Region, partition
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
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
    dispatcher = StopDispatcher(
        db, pool, metrics, StopConfig(attempts=1, backoff_initial_seconds=0.01), changed=nobody_waits
    )
    config = PollConfig(**{"full_resync_seconds": 3600.0, "agent_sync_per_cycle": 0, **poll})  # type: ignore[arg-type]
    assert config.strategy == "targeted"  # the default
    loop = build_core(
        db=db, airflow=airflow, agents=pool, dispatcher=dispatcher, metrics=metrics, poll=config
    ).loop
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
    """(d, a, t1) and (d, b, t2) are watched; the id lists also match (d, a, t2), not ours. When it
    appears deferred, never seen in flight, just as (d, a, t1) is marked failed, the two cancel and
    the count does not move: the one thing a count cannot see. The rolling full check, which reads
    rows, finds the stop within full_resync_seconds."""
    watched, partner = job_at(db, run_id="a", task_id="t1"), job_at(db, run_id="b", task_id="t2")
    airflow = deferred(watched, partner)

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
@pytest.mark.parametrize("before", ["scheduled", "running"])
def test_a_task_seen_in_flight_that_defers_as_a_drop_happens_does_not_hide_it(
    db: RouterDB, before: str
) -> None:
    """The same two changes, but the task nobody watches was in flight at an earlier read (a sensor
    starting, another sidecar's job): once it leaves flight it is expected deferred, so the drop
    beside it shows in the very next count."""
    watched, partner = job_at(db, run_id="a", task_id="t1"), job_at(db, run_id="b", task_id="t2")
    airflow = deferred(watched, partner)
    airflow.truth[("d", "a", "t2", -1)] = TaskInstance("d", "a", "t2", -1, before, 1, None)

    async def scenario(pool: AgentPool) -> str:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(watched)] = ti(watched, "failed")
        airflow.truth[("d", "a", "t2", -1)] = TaskInstance("d", "a", "t2", -1, "deferred", 1, None)
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [watched.job_id]
        return report.read

    assert run(scenario) == "targeted+locate"
    assert status(db, partner) is JobStatus.RUNNING


@pytest.mark.fast
def test_tasks_nobody_watches_that_finish_from_flight_cost_one_read_of_their_rows(db: RouterDB) -> None:
    """A task the id lists match that runs and finishes without deferring (a plain task of another
    DAG with a watched run id and task id) was expected to defer: the count falls short, and its own
    finished rows, read first, say why, without counting parts of the id lists."""
    jobs = many_jobs(db, [("d", f"r{i:03d}", f"t{i % 5}") for i in range(1000)])
    jobs += many_jobs(db, [("e", "r500", "t9")])
    airflow = deferred(*jobs)
    plain = ("e", "r123", "t3", -1)
    airflow.truth[plain] = TaskInstance(*plain, "running", 1, None)

    async def scenario(pool: AgentPool) -> tuple[str, dict[str, int]]:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        await loop.cycle()
        airflow.truth[plain] = TaskInstance(*plain, "success", 1, None)
        before = dict(loop.read.main.targeted.requests)
        report = await loop.cycle()
        assert not report.stops
        assert (await loop.cycle()).read == "targeted"
        return report.read, {k: n - before[k] for k, n in loop.read.main.targeted.requests.items()}

    read, requests = run(scenario)
    assert read == "targeted+locate"
    assert requests == {"in_flight": 2, "deferred_count": 2, "locate_count": 0, "rows": 1}


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
        before = dict(loop.read.main.targeted.requests)
        report = await loop.cycle()
        assert sorted(j.job_id for j, _ in report.stops) == sorted(j.job_id for j in marked)
        return {k: n - before[k] for k, n in loop.read.main.targeted.requests.items()}

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
        before = dict(loop.read.main.targeted.requests)
        report = await loop.cycle()
        assert sorted(j.job_id for j, _ in report.stops) == sorted(j.job_id for j in marked)
        await dispatcher.finish(10)  # the stops under way, before the agent pool closes
        return {k: n - before[k] for k, n in loop.read.main.targeted.requests.items()}

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
        assert loop.read.failing is not None and "403" in loop.read.failing
        airflow.fail_batch, airflow.listed = False, None
        await asyncio.sleep(0.25)  # past the backoff (one interval, then two)
        reads = [(await loop.cycle()).read for _ in range(2)]
        assert loop.read.failing is None
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
def test_partition_cuts_one_list_so_the_parts_cross_products_partition_the_region() -> None:
    """Whatever the keys, every task instance of the region (watched or not) is in exactly one part,
    so the parts' counts add up to the region's and a difference cannot fall between them."""
    region = Region(("a", "b", "c"), ("r1", "r2"), ("t1", "t2"))
    keys = [TaskInstancePath("a", "r1", "t1", -1)] * 5 + [TaskInstancePath("c", "r2", "t2", 3)]
    parts = partition(region, keys, 8)
    assert [p.dag_ids for p, _ in parts] == [("a",), ("b",), ("c",)]  # DAGs first, in order
    assert all((p.run_ids, p.task_ids) == (region.run_ids, region.task_ids) for p, _ in parts)
    assert [len(held) for _, held in parts] == [5, 0, 1]
    one_dag = Region(("a",), tuple(f"r{i:03d}" for i in range(100)), ("t1",))
    keys = [TaskInstancePath("a", f"r{i:03d}", "t1", -1) for i in range(100)]
    cut = partition(one_dag, keys, 8)
    assert 2 <= len(cut) <= 8 and [r for p, _ in cut for r in p.run_ids] == list(one_dag.run_ids)
    assert sorted(k for _, held in cut for k in held) == sorted(keys)
    assert partition(Region(("a",), ("r",), ("t",)), keys[:1], 8) == [
        (Region(("a",), ("r",), ("t",)), keys[:1])
    ]
    lopsided = partition(
        Region(("a", "b"), ("r",), ("t",)), [TaskInstancePath("b", "r", "t", i) for i in range(50)], 8
    )
    assert len(lopsided) == 2  # the first and last ids never share a part


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
        await dispatcher.finish(10)  # the stops under way, before the agent pool closes

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
        rows = [loop.read.main.targeted.requests["rows"]]
        for _ in range(3):
            await loop.cycle()
            rows.append(loop.read.main.targeted.requests["rows"])
        return rows

    # 2,502 task instances, a thousand a request: two requests, one, then the round is done.
    assert run(scenario) == [2, 3, 3, 3]


def gauge(metrics: Metrics) -> float:
    """reconciler_targeted_count_surplus as exported."""
    line = next(
        x for x in metrics.render().decode().splitlines() if x.startswith("reconciler_targeted_count_")
    )
    return float(line.split()[-1])


@pytest.mark.fast
def test_a_deferred_task_instance_not_watched_is_known_once_counted_and_hides_no_drop(db: RouterDB) -> None:
    """A sensor in DAG d, in a run of d no job watches, whose run id and task id are those of a
    watched task of DAG e: the id lists match it, no group of watched runs does. Its deferral is
    more than the count expects: located at once (the parts cut the id lists so that every task
    instance they match is in one part), it is known from then on, and a drop beside it shows in
    the very next count."""
    ours = job_at(db, dag_id="d", run_id="a", task_id="t1")
    others = many_jobs(db, [("e", f"b{i:03d}", "t2") for i in range(300)])
    airflow = deferred(ours, *others)
    sensor = ("d", "b123", "t2", -1)
    metrics = Metrics()

    async def scenario(pool: AgentPool) -> list[tuple[str, float]]:
        loop, _ = make_loop(db, airflow, pool, metrics=metrics)
        await loop.cycle()
        airflow.truth[sensor] = TaskInstance(*sensor, "deferred", 1, None)
        seen = []
        for _ in range(2):
            report = await loop.cycle()
            assert not report.stops
            seen.append((report.read, gauge(metrics)))
        airflow.truth[key(ours)] = ti(ours, "failed")
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [ours.job_id]
        return [*seen, (report.read, gauge(metrics))]

    assert run(scenario) == [("targeted+locate", 0.0), ("targeted", 0.0), ("targeted+locate", 0.0)]
    assert sum(status(db, j) is JobStatus.RUNNING for j in others) == 300


@pytest.mark.fast
def test_a_drop_behind_more_unknown_deferred_task_instances_is_found_in_the_same_cycle(db: RouterDB) -> None:
    """Two task instances nobody watches defer as a watched one is marked failed: the count is one
    above what the read knows. Where it is above, the deferred rows are read: the two are known, and
    the watched one missing there is looked for among the finished ones."""
    jobs = [job_at(db, run_id="r", task_id="t", map_index=i) for i in range(4)]  # one mapped task
    airflow = deferred(*jobs)
    marked = jobs[2]

    async def scenario(pool: AgentPool) -> str:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        airflow.truth[key(marked)] = ti(marked, "failed")
        for i in (7, 8):  # siblings another sidecar runs, or whose jobs were never ours
            airflow.truth[("d", "r", "t", i)] = TaskInstance("d", "r", "t", i, "deferred", 1, None)
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [marked.job_id]
        assert (await loop.cycle()).read == "targeted"  # the two are known now
        return report.read

    assert run(scenario) == "targeted+locate"
    assert sum(status(db, j) is JobStatus.RUNNING for j in jobs) == 3


@pytest.mark.fast
def test_the_surplus_gauge_is_what_the_count_showed_and_no_read_accounted_for(db: RouterDB) -> None:
    """The gauge does not net drops against task instances nobody watches: a known deferred one is
    accounted for (0), a drop whose rows cannot be read is not (1), until a read finds it (0)."""
    one, two = job_at(db, run_id="a", task_id="t1"), job_at(db, run_id="b", task_id="t2")
    airflow = deferred(one, two)
    airflow.truth[("d", "a", "t2", -1)] = TaskInstance("d", "a", "t2", -1, "deferred", 1, None)
    metrics = Metrics()

    async def scenario(pool: AgentPool) -> list[float]:
        loop, _ = make_loop(db, airflow, pool, metrics=metrics)
        await loop.cycle()
        seen = [gauge(metrics)]
        airflow.truth[key(one)] = ti(one, "failed")
        airflow.fail_states = {"success"}  # every read of finished rows answers 500
        report = await loop.cycle()
        assert report.read == "targeted+locate (1 failed)" and not report.stops
        seen.append(gauge(metrics))
        airflow.fail_states = set()
        report = await loop.cycle()
        assert [j.job_id for j, _ in report.stops] == [one.job_id]
        return [*seen, gauge(metrics)]

    assert run(scenario) == [0.0, 1.0, 0.0]


SETTLE_CYCLES = 8  # the trigger holds a finished job's success 8 s from its start: its TI stays deferred


@pytest.mark.fast
def test_short_mapped_siblings_ending_in_flight_do_not_hide_a_marked_long_one(db: RouterDB) -> None:
    """One mapped task: a long instance and short ones, one starting each cycle. Each short job ends
    while its task instance still reads running (the operator has not deferred yet); the task
    instance then defers, stays deferred through the trigger's settle, resumes and succeeds. The
    count takes those task instances in, so they must be expected there: a mark of the long one in
    the middle of the churn is stopped in the cycle after it, not by the rolling full check."""
    long = job_at(db, task_id="m", map_index=0)
    airflow = deferred(long)
    # The life of a short sibling's task instance, cycle by cycle from its job's start.
    life = ["running", *["deferred"] * SETTLE_CYCLES, "scheduled", "running", "success"]
    started: list[tuple[JobRecord, int]] = []

    async def scenario(pool: AgentPool) -> tuple[int | None, list[str]]:
        loop, _ = make_loop(db, airflow, pool)
        reads = []
        for cycle in range(40):
            for job, at in started:
                age = cycle - at
                if age < len(life):
                    airflow.truth[key(job)] = ti(job, life[age])
                if age == 1:  # its command took a second: it ended before its task instance deferred
                    db.finish(job.job_id, status=JobStatus.SUCCEEDED, rc=0, reason=None, source="agent")
            job = job_at(db, task_id="m", map_index=len(started) + 1)
            airflow.truth[key(job)] = ti(job, "running")
            started.append((job, cycle))
            if cycle == 20:
                airflow.truth[key(long)] = ti(long, "failed")
            report = await loop.cycle()
            reads.append(report.read)
            if any(j.job_id == long.job_id for j, _ in report.stops):
                return cycle - 20, reads
        return None, reads

    after, reads = run(scenario)
    assert after == 0, f"the marked long instance was not stopped within the run: {reads}"


class CountsLate(ScriptedAirflow):
    """A count that answers after the in-flight read, as a slower query does: ``flip`` (key, state)
    happens between the two, the two requests of one cycle being sent at once."""

    flip: tuple[tuple[str, str, str, int], TaskInstance] | None = None

    async def count_task_instances(self, **kwargs: Any) -> int:
        await asyncio.sleep(0.05)
        if self.flip is not None:
            self.truth[self.flip[0]], self.flip = self.flip[1], None
        return await super().count_task_instances(**kwargs)


@pytest.mark.fast
def test_a_task_that_defers_between_the_cycles_two_requests_costs_one_read(db: RouterDB) -> None:
    """A new job's task instance in flight for the in-flight read and deferred for the count: one
    more deferred than the read knows. The likely reason, read first in one request, accounts for
    it: no part of the id lists is counted, nothing is stopped. (The new job's task id also widens the
    id lists: what they newly cover is read once, its deferred rows, before the count.)"""
    jobs = many_jobs(db, [("d", f"r{i:03d}", f"t{i % 5}") for i in range(1000)])
    airflow = CountsLate(truth={key(j): ti(j, "deferred") for j in jobs})

    async def scenario(pool: AgentPool) -> tuple[list[str], dict[str, int]]:
        loop, _ = make_loop(db, airflow, pool)
        await loop.cycle()
        new = job_at(db, run_id="r500", task_id="t9")
        airflow.truth[key(new)] = ti(new, "running")
        airflow.flip = (key(new), ti(new, "deferred"))
        before = dict(loop.read.main.targeted.requests)
        reads = []
        for _ in range(2):
            report = await loop.cycle()
            assert not report.stops
            reads.append(report.read)
        return reads, {k: n - before[k] for k, n in loop.read.main.targeted.requests.items()}

    reads, requests = run(scenario)
    assert reads == ["targeted+locate", "targeted"]
    assert requests == {"in_flight": 2, "deferred_count": 2, "locate_count": 0, "rows": 1 + 1}
