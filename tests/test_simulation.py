"""The core's deterministic simulation (simulation/): seeded worlds keep every invariant, a seed
replays exactly, the simulated router DB answers as the real one; and scenarios, played on virtual
time, of the defects the simulation found. tests/test_simulation_mutants.py takes fixes out one at a
time and requires the simulation to find each."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.airflow.task_instances import TaskInstancePath
from reconciler.core import targeted
from router_db import JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey, Transition
from simulation import virtual_time
from simulation.airflow import SimAirflow, SimTI
from simulation.mutants import reverted
from simulation.play import Outcome, play
from simulation.router import SimRouterDB
from simulation.virtual_time import VirtualLoop
from simulation.world import EPOCH, Settings, Task, World

# Worlds per run of this file (about 33 ms each here); bench/simulate.py plays as many as asked.
WORLDS = int(os.environ.get("AGENTIC_SIM_WORLDS", "300"))
FIRST_SEED = int(os.environ.get("AGENTIC_SIM_SEED", "0"))


def _first_failure(seeds: range) -> Outcome | None:
    for seed in seeds:
        outcome = play(seed)
        if outcome.violations:
            return outcome
    return None


@pytest.mark.fast
def test_seeded_worlds_keep_every_invariant() -> None:
    failed = _first_failure(range(FIRST_SEED, FIRST_SEED + WORLDS))
    assert failed is None, failed.report()


@pytest.mark.fast
def test_a_seed_replays_exactly() -> None:
    first, again = play(11), play(11)
    assert first.trace == again.trace and first.jobs == again.jobs
    assert len(first.trace) > 20  # a world where things happen: jobs, marks, faults
    assert play(12).trace != first.trace


def test_a_seed_replays_exactly_in_another_process() -> None:
    """Another process hashes strings with another seed: the world must not depend on it."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    command = [sys.executable, "-m", "bench.simulate", "--replay", "11"]
    root = Path(__file__).resolve().parent.parent
    replayed = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == play(11).report() + "\n"


@pytest.mark.fast
def test_a_failing_world_says_how_to_replay_it() -> None:
    outcome = Outcome(5, play(5).settings, ["late stop: job00001"], ["   1.00  something"], 1, 10.0)
    report = outcome.report()
    assert "world 5" in report and "late stop" in report and "--replay 5" in report


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(5))
def test_the_simulated_router_db_answers_as_the_real_one(seed: int) -> None:
    """The same random operations on both: the same statuses, reasons, answers and refusals."""
    rng = random.Random(seed)
    moment = [datetime(2026, 12, 7, tzinfo=UTC)]
    real = RouterDB("sqlite://")
    real.create_schema()
    sim = SimRouterDB(lambda: moment[0])
    ids: list[tuple[str, str]] = []  # (real id, simulated id)
    statuses = list(JobStatus)
    for step in range(200):
        moment[0] += timedelta(seconds=1)
        action = rng.random()
        if action < 0.3 or not ids:
            key = TaskInstanceKey(
                dag_id="d", task_id=f"t{rng.randint(0, 3)}", run_id="r", try_number=rng.randint(1, 2)
            )
            new = NewJob(key, f"vm{rng.randint(1, 2)}", "work", ti_identity=f"id{rng.randint(0, 1)}")
            (a, created_a), (b, created_b) = real.submit(new), sim.submit(new)
            assert created_a == created_b and (a.key, a.status) == (b.key, b.status)
            if created_a:
                ids.append((a.job_id, b.job_id))
            continue
        picked = [rng.choice(ids) for _ in range(rng.randint(1, 3))]
        transitions = []
        for _ in picked:
            new_status = rng.choice(statuses)
            expect = rng.choice([None, rng.choice(statuses)])
            if new_status is JobStatus.STOPPING:
                transitions.append(lambda i: Transition.stop(i, JobStatus.FAILED, "stop"))
            elif new_status is JobStatus.RUNNING or new_status is JobStatus.QUEUED:
                transitions.append(lambda i: Transition.running(i))
            else:
                transitions.append(
                    lambda i, s=new_status, e=expect: Transition.finish(i, s, 0, "end", expect=e)
                )
        pairs = list(zip(transitions, picked, strict=True))
        got_real = real.apply([make(r) for make, (r, _) in pairs], source="test")
        got_sim = sim.apply([make(s) for make, (_, s) in pairs], source="test")
        shape = lambda job: None if job is None else (job.status, job.reason, job.rc, job.stop_status)  # noqa: E731
        assert [shape(j) for j in got_real] == [shape(j) for j in got_sim], step
        assert sorted(real.active_counts().items()) == sorted(sim.active_counts().items())
        for task in ("t0", "t1", "t2", "t3"):
            a = real.find_latest(dag_id="d", task_id=task, run_id="r")
            b = sim.find_latest(dag_id="d", task_id=task, run_id="r")
            assert (a is None) == (b is None)
            assert (
                a is None or b is None or (a.key, a.ti_identity, a.status) == (b.key, b.ti_identity, b.status)
            )
            tries = (
                real.active_tries(dag_id="d", task_id=task, run_id="r"),
                sim.active_tries(dag_id="d", task_id=task, run_id="r"),
            )
            assert sorted((j.key.try_number, j.ti_identity) for j in tries[0]) == sorted(
                (j.key.try_number, j.ti_identity) for j in tries[1]
            )
        if rng.random() < 0.1:  # forget a job its agent refused: only a QUEUED one on that agent goes
            real_id, sim_id = rng.choice(ids)
            agent = f"vm{rng.randint(1, 2)}"
            assert real.forget_unstarted(real_id, agent_id=agent) == sim.forget_unstarted(
                sim_id, agent_id=agent
            )
            if real.get(real_id) is None:
                ids.remove((real_id, sim_id))
        for real_id, sim_id in ids:
            a, b = real.get(real_id), sim.get(sim_id)
            assert a is not None and b is not None and shape(a) == shape(b)
            assert [(e.old_status, e.new_status, e.source) for e in real.events(real_id)] == [
                (e.old_status, e.new_status, e.source) for e in sim.events(sim_id)
            ]
    real.dispose()


def _scene(**changes: object) -> Settings:
    """A quiet world (no random people nor faults) for a scripted scenario."""
    quiet = Settings(
        strategy="targeted",
        interval=1.0,
        full_resync=300.0,
        agents=2,
        dags=1,
        tasks=6,
        mapped=0,
        runs=1,
        sensors=0,
        page_size=100,
        duration=60.0,
        skew=dict.fromkeys(("sidecar", "airflow", "db", "agents"), 0.0),
        retries=0,
        rates=dict.fromkeys(
            ("person", "run", "airflow_fault", "db_fault", "agent_fault", "sidecar_restart"), 0.0
        ),
        job_seconds=(600.0,),
    )
    return dataclasses.replace(quiet, **changes)  # type: ignore[arg-type]


def _play_scene(seed: int, settings: Settings, script: list[tuple[float, Callable[[World], None]]]) -> World:
    async def main(loop: VirtualLoop) -> World:
        world = World(seed, settings, random.Random(seed), loop, script=script)
        await world.run()
        return world

    return virtual_time.run(main)


def _long_running(world: World) -> Task:
    """The deferred watched task whose job runs on longest (a scenario's target)."""

    def ends(task: Task) -> float:
        job = world.db.jobs[task.job_id or ""]
        agent = world.agent[job.agent_id]
        return agent.jobs[job.job_id].ends_at if job.status is JobStatus.RUNNING else -1.0

    deferred = [t for t in world.tasks.values() if t.job_id is not None and t.ti.state == "deferred"]
    return max(deferred, key=ends)


@pytest.mark.fast
def test_a_silent_agent_does_not_slow_the_reads_of_airflow() -> None:
    """Another agent stops answering (requests time out after 5 s); a task whose job runs on an agent
    that answers is marked failed: its job is STOPPING within 3 poll intervals + 2 s, as with every
    agent answering. Before, every cycle waited for its round with the agents, so each read of
    Airflow came up to 5 s late."""
    targets: list[Task] = []

    def silence_the_other(world: World) -> None:
        target = _long_running(world)
        targets.append(target)
        job = world.db.jobs[target.job_id or ""]
        other = next(a for a in world.agents if a.agent_id != job.agent_id)
        world.window("requests_lost", other.agent_id, 40.0)
        assert any(world.db.jobs[j].agent_id == other.agent_id for j in world.db.jobs)  # it has jobs to hear

    def mark(world: World) -> None:
        world.airflow.set_state(targets[0].ti, "failed")
        world.say(f"person: marks {targets[0].ti.path} failed")

    world = _play_scene(3, _scene(interval=0.5), [(20.0, silence_the_other), (21.0, mark)])
    assert world.checker.violations == [], "\n".join(world.trace)
    job_id = targets[0].job_id or ""
    stopping = [e.at for e in world.db.events(job_id) if e.new_status is JobStatus.STOPPING]
    assert stopping, "\n".join(world.trace)
    took = (stopping[0] - EPOCH).total_seconds() - 21.0
    print(f"marked at 21.0 s with another agent silent: STOPPING {took:.2f} s later")
    assert took <= 3 * 0.5 + 2.0


@pytest.mark.fast
@pytest.mark.parametrize("seed", [227, 349, 435, 441, 1408])
def test_the_worlds_that_found_defects_stay_clean(seed: int) -> None:
    """Each of these seeds broke an invariant before a fix (bench/RESULTS.md, "The core's simulation"):
    227 and 349 late stops (a failed read, widened id lists), 435 a late stop (batch backing off its
    full read), 441 a hang (rounds with the agents waiting for a slow Airflow's cycles), 1408 a hang
    (a job submitted during a slow cycle, missing from the list its agent's round was chosen by)."""
    outcome = play(seed)
    assert outcome.violations == [], outcome.report()


@pytest.mark.fast
def test_a_task_cleared_and_run_again_while_airflow_is_down_is_found_when_it_answers() -> None:
    """Airflow answers 500 for 30 s; meanwhile a deferred task is cleared, and its next try runs and
    defers again: no read saw it leave. Its old try's job is stopped within seconds of Airflow
    answering again; before, it waited for the rolling full check (here 300 s)."""
    cleared: list[Task] = []

    def clear(world: World) -> None:
        task = _long_running(world)
        cleared.append(dataclasses.replace(task))
        world.airflow.new_try(task.ti)
        world.say(f"person: clears {task.ti.path}")

    script = [(18.0, lambda w: w.window("500", "airflow", 30.0)), (20.0, clear)]
    world = _play_scene(5, _scene(duration=80.0), script)
    assert world.checker.violations == [], "\n".join(world.trace)
    (before,) = cleared
    assert before.job_id is not None
    task = world.tasks[before.ti.path]
    assert task.ti.try_number == 2 and task.job_id != before.job_id  # the next try ran, on a job of its own
    resubmitted = [line for line in world.trace if f"submitted {task.job_id}" in line]
    assert resubmitted and float(resubmitted[0].split()[0]) < 48.0, "\n".join(world.trace)  # in the outage
    stopping = [e.at for e in world.db.events(before.job_id) if e.new_status is JobStatus.STOPPING]
    assert stopping, "\n".join(world.trace)
    took = (stopping[0] - EPOCH).total_seconds() - 48.0
    print(f"Airflow back at 48.0 s: the cleared try's job STOPPING {took:.2f} s later")
    assert took <= 3 * 1.0 + 2.0


@pytest.mark.fast
def test_a_drop_hidden_by_widened_id_lists_is_found_in_the_same_cycle() -> None:
    """Found by the simulation (world 349): a new job adds a task id to the batch read's id lists,
    which brings into the count a sensor that had deferred unseen, in the very cycle a watched task is
    marked success. The two cancelled, and the mark waited for the rolling full check."""
    moment = datetime(2026, 12, 7, tzinfo=UTC)
    airflow = SimAirflow(lambda: moment, page_size=100)
    db = SimRouterDB(lambda: moment)

    def ti(dag: str, task: str, state: str, *, watched: bool = True) -> tuple[SimTI, JobRecord | None]:
        path = TaskInstancePath(dag, "run0", task, -1)
        made = airflow.tis[path] = SimTI(path, state, 1, airflow.new_identity(), moment, watched=watched)
        if not watched:
            return made, None
        key = TaskInstanceKey(dag_id=dag, task_id=task, run_id="run0")
        job, _ = db.submit(NewJob(key, "vm1", "work", ti_identity=made.identity))
        return made, job

    marked, marked_job = ti("dag0", "task1", "deferred")
    _, other_job = ti("dag1", "task2", "deferred")
    ti("dag1", "task0", "deferred", watched=False)  # a sensor with a task id no job has yet

    async def main(loop: VirtualLoop) -> dict[str, object]:
        read = targeted.TargetedRead(airflow, full_check_seconds=300.0, concurrency=4, clock=loop.time)
        assert marked_job and other_job
        await read.read([marked_job, other_job])
        airflow.set_state(marked, "success")  # a person marks it; in the same cycle a new job starts
        _, new_job = ti("dag0", "task0", "running")
        assert new_job
        found, _ = await read.read([marked_job, other_job, new_job])
        return dict(found)

    found = virtual_time.run(main)
    assert marked_job is not None and marked_job.job_id in found, found


@pytest.mark.fast
@pytest.mark.parametrize("fixed", [True, False])
def test_a_sensor_that_defers_unseen_hides_no_mark(fixed: bool) -> None:
    """World defect 5: a task instance nobody watches defers between two reads, never seen in flight,
    and raises the count; a watched task marked two cycles later must still be found. With the fix
    taken out (simulation/mutants.py, "count-surplus"), the surplus is taken as explained and the mark
    is hidden. (The random worlds no longer reach this path since the widened-lists fix: every task
    instance they make is seen in flight first, or enters the lists with a new id.)"""
    moment = datetime(2026, 12, 7, tzinfo=UTC)
    airflow = SimAirflow(lambda: moment, page_size=100)
    db = SimRouterDB(lambda: moment)
    path = TaskInstancePath("dag0", "run0", "task0", -1)
    marked = airflow.tis[path] = SimTI(path, "deferred", 1, airflow.new_identity(), moment)
    job, _ = db.submit(
        NewJob(
            TaskInstanceKey(dag_id="dag0", task_id="task0", run_id="run0"),
            "vm1",
            "work",
            ti_identity=marked.identity,
        )
    )
    sensor_path = TaskInstancePath("dag0", "run0", "task0", 3)  # a map index of the watched task: counted

    async def main(loop: VirtualLoop) -> dict[str, object]:
        read = targeted.TargetedRead(airflow, full_check_seconds=300.0, concurrency=4, clock=loop.time)
        await read.read([job])
        airflow.tis[sensor_path] = SimTI(
            sensor_path, "deferred", 1, airflow.new_identity(), moment, watched=False
        )
        await read.read([job])  # the surplus
        airflow.set_state(marked, "failed")
        found, _ = await read.read([job])
        return dict(found)

    with contextlib.nullcontext() if fixed else reverted("count-surplus"):
        found = virtual_time.run(main)
    assert (job.job_id in found) is fixed, found


def _job_on(airflow: SimAirflow, db: SimRouterDB, path: TaskInstancePath, state: str) -> JobRecord:
    ti = airflow.tis[path] = SimTI(path, state, 1, airflow.new_identity(), airflow.clock())
    key = TaskInstanceKey(
        dag_id=path.dag_id, task_id=path.task_id, run_id=path.run_id, map_index=path.map_index
    )
    job, _ = db.submit(NewJob(key, "vm1", "work", ti_identity=ti.identity))
    return job


@pytest.mark.fast
def test_id_lists_that_grow_back_after_every_job_ended_are_read_again() -> None:
    """A sensor the read learnt is forgotten once no job's lists cover it; when a job comes back under
    the same ids, the lists are new again and their deferred rows are read, so the sensor cannot
    cancel that job's task marked failed in the count."""
    moment = datetime(2026, 12, 7, tzinfo=UTC)
    airflow, db = SimAirflow(lambda: moment, page_size=100), SimRouterDB(lambda: moment)
    first = _job_on(airflow, db, TaskInstancePath("dag0", "run0", "task0", 0), "deferred")
    sensor = TaskInstancePath("dag0", "run0", "task0", 7)
    airflow.tis[sensor] = SimTI(sensor, "deferred", 1, airflow.new_identity(), moment, watched=False)

    async def main(loop: VirtualLoop) -> dict[str, object]:
        read = targeted.TargetedRead(airflow, full_check_seconds=300.0, concurrency=4, clock=loop.time)
        await read.read([first])  # the sensor is counted and located
        await read.read([])  # the job ended: nothing is covered, nothing known
        airflow.set_state(airflow.tis[TaskInstancePath("dag0", "run0", "task0", 0)], "success")
        again = _job_on(airflow, db, TaskInstancePath("dag0", "run0", "task0", 1), "failed")
        found, _ = await read.read([again])  # marked failed before any read saw it deferred
        return {"again": again.job_id, **found}

    found = virtual_time.run(main)
    assert found["again"] in found, found


@pytest.mark.fast
def test_a_read_failing_every_few_cycles_still_has_every_run_checked() -> None:
    """Each failed read puts the full check at full speed; it must not start its round over, or with
    Airflow failing every other cycle the last runs of a three-cycle round would never be read."""
    moment = datetime(2026, 12, 7, tzinfo=UTC)
    airflow, db = SimAirflow(lambda: moment, page_size=1000), SimRouterDB(lambda: moment)
    jobs = [
        _job_on(airflow, db, TaskInstancePath("dag0", f"run{r:03d}", f"task{t}", -1), "deferred")
        for r in range(120)
        for t in range(50)
    ]
    checked: set[str] = set()

    async def main(loop: VirtualLoop) -> None:
        read = targeted.TargetedRead(airflow, full_check_seconds=300.0, concurrency=4, clock=loop.time)
        due = read._due

        def recorded(watched: object, now: float) -> list[tuple[str, str]]:
            runs = due(watched, now)  # type: ignore[arg-type]
            checked.update(run for _, run in runs)
            return runs

        read._due = recorded  # type: ignore[method-assign]
        for cycle in range(12):
            await read.read(jobs)
            if cycle % 2 == 1:  # a round at full speed takes three cycles here (2,000 rows a cycle)
                read.missed()  # as the loop does after a read Airflow failed

    virtual_time.run(main)
    assert checked == {f"run{r:03d}" for r in range(120)}, sorted(
        {f"run{r:03d}" for r in range(120)} - checked
    )[:5]
