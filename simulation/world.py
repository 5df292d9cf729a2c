"""One seeded world: a sidecar's core (the real :class:`reconciler.core.loop.ReconcileLoop`, read strategies,
decision, confirmation, :class:`reconciler.core.stops.StopDispatcher` and agent catch-up) against Airflow,
agents and a router DB that the world moves at random, on virtual time.

Every ``STEP`` seconds the world plays Airflow's scheduler, its triggerer (a deferred task follows its
job's end), people (mark failed or success, clear, delete a run or create it again), sensors that defer
beside the watched tasks, and faults: Airflow answering 5xx, 429 or slowly or refusing the batch
endpoint, the router DB down, agents paused, cut off one way, restarted or recreated empty, the
sidecar restarted, clocks skewed. Then it checks the invariants (:mod:`simulation.invariants`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import OperationalError

from reconciler.airflow.task_instances import AirflowError, TaskInstancePath
from reconciler.config import AgentEntry, PollConfig, StopConfig
from reconciler.core.loop import ReconcileLoop
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.core.watch import JobWatch
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import JobRecord, NewJob, TaskInstanceKey
from simulation.agents import SimAgent, SimNetwork
from simulation.airflow import SimAirflow, SimTI
from simulation.invariants import STOP_BACKOFF, STOP_TIMEOUT, Checker
from simulation.router import SimRouterDB
from simulation.virtual_time import VirtualLoop

STEP = 0.5  # seconds of world time between the world's moves
EPOCH = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Settings:
    """What a seed draws before the world starts."""

    strategy: str
    interval: float
    full_resync: float
    agents: int
    dags: int
    tasks: int
    mapped: int
    runs: int
    sensors: int
    page_size: int
    duration: float
    skew: dict[str, float]  # seconds each clock is off: sidecar, airflow, db, agents
    retries: int
    rates: dict[str, float]  # events per second of world time
    job_seconds: tuple[float, ...] = (0.5, 2.0, 10.0, 60.0, 600.0)  # how long a job may run by itself

    @classmethod
    def draw(cls, rng: random.Random) -> Settings:
        return cls(
            strategy=rng.choices(["targeted", "incremental", "batch"], [6, 2, 2])[0],
            interval=rng.choice([0.5, 1.0, 2.0]),
            full_resync=rng.choice([60.0, 120.0, 300.0]),
            agents=rng.randint(1, 3),
            dags=rng.randint(1, 2),
            tasks=rng.randint(1, 3),
            mapped=rng.choice([0, 0, 2, 4]),
            runs=rng.randint(1, 2),
            sensors=rng.randint(0, 3),
            page_size=rng.choice([1, 2, 3, 100]),
            duration=rng.uniform(30.0, 120.0),
            skew={
                name: rng.choice([0.0, 0.0, rng.uniform(-150.0, 150.0)])
                for name in ("sidecar", "airflow", "db", "agents")
            },
            retries=rng.randint(0, 2),
            rates={
                "person": rng.choice([0.02, 0.1, 0.3]),
                "run": rng.choice([0.0, 0.01, 0.03]),
                "airflow_fault": rng.choice([0.0, 0.01, 0.03]),
                "db_fault": rng.choice([0.0, 0.0, 0.01]),
                "agent_fault": rng.choice([0.0, 0.01, 0.03]),
                "sidecar_restart": rng.choice([0.0, 0.0, 0.01]),
            },
        )


@dataclass
class Window:
    """A fault that lasts until ``until`` (world time)."""

    kind: str
    until: float
    target: str = ""


@dataclass
class Task:
    """A watched task instance's operator: the job of its current try, once submitted."""

    ti: SimTI
    job_id: str | None = None
    next_move: float = 0.0  # world time of its next scheduler or trigger move


@dataclass
class World:
    seed: int
    settings: Settings
    rng: random.Random
    loop: VirtualLoop
    trace: list[str] = field(default_factory=list)
    # Scripted moves on top of the random ones: (world time, what to do), for scenarios.
    script: list[tuple[float, Callable[[World], None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self.db = SimRouterDB(self._clock("db"))
        self.airflow = SimAirflow(self._clock("airflow"), s.page_size)
        self.network = SimNetwork()
        self.agents = [
            SimAgent(f"vm{i}", f"http://vm{i}.sim:8791", self._clock("agents"))
            for i in range(1, s.agents + 1)
        ]
        self.agent = {a.agent_id: a for a in self.agents}  # by id
        for agent in self.agents:
            self.network.agents[agent.url] = agent
        self.tasks: dict[TaskInstancePath, Task] = {}
        self.windows: list[Window] = []
        self.checker = Checker(self)
        self.airflow.fault = self._airflow_fault
        self.airflow.latency = self._airflow_latency
        self.db.fail = self._db_fault
        self.sidecar_down_until = 0.0
        self.refused_until = float("-inf")  # end of the last window in which Airflow refused batch reads
        self._runs_made = 0
        for run in range(s.runs):
            self._create_run(f"run{run}")

    # --- clocks -----------------------------------------------------------------------------------------

    def _clock(self, who: str) -> Callable[[], datetime]:
        skew = timedelta(seconds=self.settings.skew[who])
        return lambda: EPOCH + skew + timedelta(seconds=self.loop.time())

    @property
    def now(self) -> float:
        return self.loop.time()

    def say(self, what: str) -> None:
        self.trace.append(f"{self.now:8.2f}  {what}")

    # --- the sidecar ------------------------------------------------------------------------------------

    def build_sidecar(self) -> ReconcileLoop:
        s = self.settings
        entries = [AgentEntry(id=a.agent_id, url=a.url, labels=["default"]) for a in self.agents]
        pool = AgentPool(
            entries,
            {a.agent_id: "token" for a in self.agents},
            timeout=5.0,
            stop_timeout=STOP_TIMEOUT,
            transport=self.network,
        )
        metrics = Metrics()
        config = StopConfig(timeout_seconds=STOP_TIMEOUT, backoff_max_seconds=STOP_BACKOFF)
        watch = JobWatch(self.db)  # type: ignore[arg-type]
        dispatcher = StopDispatcher(self.db, pool, metrics, config, changed=watch.notify)  # type: ignore[arg-type]
        poll = PollConfig(
            interval_seconds=s.interval,
            strategy=s.strategy,
            full_resync_seconds=s.full_resync,
        )
        core = build_core(
            db=self.db,  # type: ignore[arg-type]
            airflow=self.airflow,
            agents=pool,
            dispatcher=dispatcher,
            metrics=metrics,
            poll=poll,
            clock=self.loop.time,
            wall=self._clock("sidecar"),
            watch=watch,
        )
        loop = core.loop
        return loop

    async def run(self) -> list[str]:
        """Play the world to its end; the invariants' violations (none: the world was kept)."""
        stopping = asyncio.Event()
        loop = self.build_sidecar()
        sidecar = asyncio.create_task(loop.run(stopping))
        while self.now < self.settings.duration and not self.checker.violations:
            await asyncio.sleep(STEP)
            self._expire_windows()
            while self.script and self.script[0][0] <= self.now:
                self.script.pop(0)[1](self)
            if sidecar.done() and self.now >= self.sidecar_down_until:
                self.say("sidecar starts again (a new term: nothing remembered)")
                stopping = asyncio.Event()
                loop = self.build_sidecar()
                sidecar = asyncio.create_task(loop.run(stopping))
            self._move_agents()
            self._move_airflow()
            self._people()
            if not sidecar.done() and self._happens("sidecar_restart"):
                down = self.rng.uniform(0.0, 10.0)
                self.say(f"sidecar killed (SIGKILL), back in {down:.1f} s")
                await self._kill_sidecar()
                self.sidecar_down_until = self.now + down
            self._faults()
            self.checker.step(STEP, sidecar_up=not sidecar.done())
        stopping.set()
        await self._kill_sidecar()
        return self.checker.violations

    async def _kill_sidecar(self) -> None:
        """Everything the sidecar runs dies at once (its loop, stops under way, rounds with the
        agents), as with SIGKILL: every task but the world's own."""
        world = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not world]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- Airflow: runs, the scheduler, the triggerer -----------------------------------------------------

    def _create_run(self, run_id: str) -> None:
        s = self.settings
        for d in range(s.dags):
            dag = f"dag{d}"
            for t in range(s.tasks):
                # In the second DAG, a sensor may carry a watched task's id (same run id too).
                shared = d == 1 and t == 0 and s.sensors > 0
                indexes = range(s.mapped) if (s.mapped and t == 0 and not shared) else [-1]
                for index in indexes:
                    self._add_ti(TaskInstancePath(dag, run_id, f"task{t}", index), watched=not shared)
            for n in range(s.sensors):
                self._add_ti(TaskInstancePath(dag, run_id, f"sensor{n}", -1), watched=False)

    def _add_ti(self, path: TaskInstancePath, *, watched: bool) -> None:
        ti = SimTI(path, None, 1, self.airflow.new_identity(), self.airflow.clock(), watched=watched)
        self.airflow.tis[path] = ti
        self.tasks[path] = Task(ti, next_move=self.now + self.rng.uniform(0.0, 3.0))

    def _move_airflow(self) -> None:
        for path, task in list(self.tasks.items()):
            if self.airflow.tis.get(path) is not task.ti or self.now < task.next_move:
                continue
            ti, later = task.ti, self.now + self.rng.choice([0.1, 0.5, 1.0, 3.0, 10.0])
            task.next_move = later
            state = ti.state
            if state is None:
                self.airflow.set_state(ti, "scheduled")
            elif state == "scheduled":
                self.airflow.set_state(ti, "queued")
            elif state == "queued":
                self.airflow.set_state(ti, "running")
            elif state == "running" and not ti.watched:
                self.airflow.set_state(ti, "deferred")
            elif state == "running":
                if task.job_id is None or self._job(task).ti_identity != ti.identity:  # an id per try
                    self._submit(task)
                elif self.rng.random() < 0.9:
                    self.airflow.set_state(ti, "deferred")  # the operator defers on its job
            elif state == "deferred" and not ti.watched:
                if self.rng.random() < 0.1:  # a sensor waits a while
                    self.airflow.set_state(ti, "success")
            elif state == "deferred":
                self._trigger(task)
            elif state == "up_for_retry":
                self.airflow.new_try(ti)
                self.say(f"airflow: {_name(path)} try {ti.try_number} scheduled")

    def _job(self, task: Task) -> JobRecord:
        assert task.job_id is not None
        return self.db.jobs[task.job_id]

    def _submit(self, task: Task) -> None:
        """The operator submits its try's job (the submission itself is not simulated: it either happens
        whole, or waits for an agent that answers)."""
        ti = task.ti
        reachable = [a for a in self.agents if not (a.paused or a.requests_lost or a.answers_lost)]
        if not reachable or self.db.fail("submit") is not None:
            return
        agent = self.rng.choice(reachable)
        key = TaskInstanceKey(
            dag_id=ti.path.dag_id,
            task_id=ti.path.task_id,
            run_id=ti.path.run_id,
            map_index=ti.path.map_index,
            try_number=ti.try_number,
        )
        job, _ = self.db.submit(NewJob(key, agent.agent_id, "work", ti_identity=ti.identity))
        duration = self.rng.choice(self.settings.job_seconds)
        agent.start(job.job_id, now=self.now, duration=duration, rc=self.rng.choice([0, 0, 0, 1]))
        self.db.mark_running(job.job_id, source="submit")
        task.job_id = job.job_id
        self.checker.started(job.job_id)
        submitted = f"submitted {job.job_id} to {agent.agent_id} ({duration:g} s)"
        self.say(f"operator: {_name(ti.path)} try {ti.try_number} {submitted}")

    def _trigger(self, task: Task) -> None:
        """The deferred task's trigger: once its job has ended in the router DB, the task follows."""
        if task.job_id is None:
            return
        job = self._job(task)
        if job.active or job.ti_identity != task.ti.identity:
            return
        ti = task.ti
        if job.status == "SUCCEEDED":
            self.airflow.set_state(ti, "success")
        elif ti.try_number <= self.settings.retries:
            self.airflow.set_state(ti, "up_for_retry")
        else:
            self.airflow.set_state(ti, "failed")
        self.say(f"airflow: {_name(ti.path)} try {ti.try_number} {ti.state} after its job {job.status}")

    # --- people ------------------------------------------------------------------------------------------

    def _happens(self, what: str) -> bool:
        return self.rng.random() < self.settings.rates[what] * STEP

    def _people(self) -> None:
        if self._happens("person"):
            live = [
                t
                for t in self.tasks.values()
                if self.airflow.tis.get(t.ti.path) is t.ti and t.ti.state in ("running", "deferred")
            ]
            if live:
                task = self.rng.choice(live)
                action = self.rng.choice(["failed", "success", "clear"])
                if action == "clear":
                    self.airflow.new_try(task.ti)
                else:
                    self.airflow.set_state(task.ti, action)
                self.say(
                    f"person: {_name(task.ti.path)} {'cleared' if action == 'clear' else 'marked ' + action}"
                )
        if self._happens("run"):
            run_id = self.rng.choice(sorted({p.run_id for p in self.airflow.tis} | {"run0"}))
            for path in [p for p in self.airflow.tis if p.run_id == run_id]:
                del self.airflow.tis[path]
            again = self.rng.random() < 0.5
            self.say(f"person: run {run_id} deleted{' and created again' if again else ''}")
            if again:
                self._create_run(run_id)

    # --- faults -------------------------------------------------------------------------------------------

    def _faults(self) -> None:
        if self._happens("airflow_fault"):
            kind = self.rng.choice(["500", "503", "429", "slow", "refuse"])
            self.window(kind, "airflow")
        if self._happens("db_fault"):
            self.window("down", "db")
        if self._happens("agent_fault"):
            agent = self.rng.choice(self.agents)
            kind = self.rng.choice(["paused", "requests_lost", "answers_lost", "restart", "recreated"])
            if kind in ("restart", "recreated"):
                agent.restart(empty_home=kind == "recreated")
                what = "recreated with an empty home" if kind == "recreated" else "restarted"
                self.say(f"agent {agent.agent_id} {what}")
            else:
                self.window(kind, agent.agent_id)

    def window(self, kind: str, target: str, length: float | None = None) -> None:
        """A fault on ``target`` (airflow, db, or an agent's id) for ``length`` seconds (default: drawn)."""
        length = length or self.rng.choice([1.0, 5.0, 20.0])
        self.windows.append(Window(kind, self.now + length, target))
        agent = self.agent.get(target)
        if agent is not None:
            setattr(agent, kind, True)  # paused, requests_lost or answers_lost
        if kind == "refuse":
            self.refused_until = max(self.refused_until, self.now + length)
        self.say(f"fault: {target} {kind} for {length:g} s")

    def _expire_windows(self) -> None:
        for window in [w for w in self.windows if w.until <= self.now]:
            self.windows.remove(window)
            agent = self.agent.get(window.target)
            if agent is not None and not any(
                w.target == window.target and w.kind == window.kind for w in self.windows
            ):
                setattr(agent, window.kind, False)
            self.say(f"fault over: {window.target} {window.kind}")

    def faulty(self, target: str) -> bool:
        return any(w.target == target for w in self.windows)

    def _airflow_fault(self, request: str) -> AirflowError | None:
        for window in self.windows:
            if window.target != "airflow":
                continue
            if window.kind in ("500", "503", "429"):
                return AirflowError(f"HTTP {window.kind}", status=int(window.kind))
            if window.kind == "refuse" and request in ("task_instance_pages", "count_task_instances"):
                return AirflowError("HTTP 403: the batch endpoint refuses this read", status=403)
        return None

    def _airflow_latency(self, request: str) -> float:
        return 2.0 if any(w.target == "airflow" and w.kind == "slow" for w in self.windows) else 0.0

    def _db_fault(self, operation: str) -> Exception | None:
        if self.faulty("db"):
            return OperationalError(operation, {}, Exception("router DB unreachable"))
        return None

    def _move_agents(self) -> None:
        for agent in self.agents:
            if not agent.paused:
                agent.tick(self.now)


def _name(path: TaskInstancePath) -> str:
    index = f"[{path.map_index}]" if path.map_index >= 0 else ""
    return f"{path.dag_id}/{path.run_id}/{path.task_id}{index}"
