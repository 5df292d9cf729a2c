"""What the sidecar promises, checked after every step of a world.

- **No false stop.** No stop is decided, nor reaches an agent, for a job whose task instance still
  wants it (the same try, by its id, in a state where its work goes on).
- **No false end.** No job is ended in the router DB while its process runs on, unless a stop was
  decided for it.
- **Bounded detection.** A job whose task instance no longer wants it is STOPPING or ended within
  ``detect_bound`` seconds of the world's healthy time (Airflow and the router DB answering, the
  sidecar running).
- **No hang.** No job stays active in the router DB while its agent has ended it or does not know it,
  and no decided stop fails to reach a process still running, beyond ``hang_bound`` seconds with
  the sidecar and the router DB up and that agent answering, whatever Airflow does: rounds with the
  agents run on their own clock, apart from the cycles (world 441 found them waiting for slow reads
  of Airflow when they started once a cycle).
- **Nothing lost.** No job row vanishes, and an ended job never changes again.

"Healthy time" leaves out the faults the world injected: a bound is a promise about how fast the
sidecar acts once it can, not about outages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_api.protocol import AgentJobStatus
from reconciler.airflow.task_instances import TaskInstancePath
from reconciler.config import PollConfig
from router_db import JobRecord, JobStatus

if TYPE_CHECKING:
    from simulation.world import World


# The task-instance states in which Airflow wants its try's work to go on: written out here, not taken
# from reconciler.core.decision, so that a wrong decision table cannot agree with itself.
WANTED = frozenset({"running", "deferred", "queued", "scheduled", "up_for_reschedule"})
STOP_TIMEOUT, STOP_BACKOFF = 10.0, 5.0  # the world's [stop] timeout_seconds and backoff_max_seconds
AGENT_READ_SECONDS = 5.0  # reconciler.core.catch_up.READ_TIMEOUT_SECONDS: a round with the agents waits this


class Checker:
    def __init__(self, world: World) -> None:
        self.world = world
        s = world.settings
        self.detect_bound = 3 * s.interval + 2.0
        self.hang_bound = 5 * s.interval + 3.0
        # Incremental reads compare this host's clock with Airflow's: beyond overlap_seconds of skew
        # they miss changes, as they miss deleted runs; the full read, every full_resync_seconds,
        # catches those (docs/configuration.md, [poll] overlap_seconds and full_resync_seconds).
        self._skewed = s.skew["sidecar"] - s.skew["airflow"] > PollConfig().overlap_seconds  # host ahead
        self.violations: list[str] = []
        self._diverged: dict[str, float] = {}  # job id -> healthy seconds since Airflow stopped wanting it
        self._allowed: dict[str, float] = {}  # job id -> what the documented limits add to its bound
        self._hanging: dict[str, float] = {}  # job id -> healthy seconds its agent has not run it
        self._ended: dict[str, JobRecord] = {}
        self._seen: set[str] = set()
        self._agent_trouble_until = float("-inf")
        world.db.on_apply = self._applied
        for agent in world.agents:
            agent.on_stop = self._stop_arrived

    def _allowance(self, job: JobRecord) -> float:
        """Seconds the documented limits add to the detection bound for ``job`` now."""
        world, s = self.world, self.world.settings
        extra = 0.0
        incremental = s.strategy == "incremental" or (
            s.strategy == "targeted" and world.now < world.refused_until + s.full_resync
        )
        key = job.key
        deleted = (
            TaskInstancePath(key.dag_id, key.run_id, key.task_id, key.map_index) not in world.airflow.tis
        )
        if incremental and (deleted or self._skewed):
            extra += s.full_resync
        return extra

    def wants(self, job: JobRecord) -> bool:
        """Airflow wants this job's work to go on: its very task instance try, in a state of work."""
        key = job.key
        ti = self.world.airflow.tis.get(TaskInstancePath(key.dag_id, key.run_id, key.task_id, key.map_index))
        return ti is not None and ti.identity == job.ti_identity and ti.state in WANTED

    def _runs(self, job: JobRecord) -> bool:
        on_agent = self.world.agent[job.agent_id].jobs.get(job.job_id)
        return on_agent is not None and on_agent.status is AgentJobStatus.RUNNING

    def started(self, job_id: str) -> None:
        self._seen.add(job_id)

    def _violate(self, what: str) -> None:
        self.world.say(f"VIOLATION: {what}")
        self.violations.append(what)

    def _applied(self, before: JobRecord, after: JobRecord, source: str) -> None:
        self.world.say(
            f"router DB: {after.job_id} {before.status} -> {after.status} by {source}: {after.reason}"
        )
        if after.status is JobStatus.STOPPING and self.wants(before):
            self._violate(f"false stop: {after.job_id} set STOPPING ({after.reason}) while Airflow wants it")
        elif not after.active and before.status is not JobStatus.STOPPING and self._runs(after):
            # Ended while its process runs on: the task moves on, and the process is an orphan.
            self._violate(f"false end: {after.job_id} ended {after.status} ({after.reason}) while it runs")

    def _stop_arrived(self, job_id: str) -> None:
        job = self.world.db.jobs.get(job_id)
        self.world.say(f"agent: stop request for {job_id}")
        if job is not None and self.wants(job):
            self._violate(f"false stop: a stop for {job_id} reached its agent while Airflow wants it")

    def step(self, seconds: float, *, sidecar_up: bool) -> None:
        """Check the world after ``seconds`` of world time passed."""
        world = self.world
        healthy = sidecar_up and not world.faulty("airflow") and not world.faulty("db")
        agents_heard = sidecar_up and not world.faulty("db")  # what recording the agents' news needs
        if any(a.paused or a.requests_lost or a.answers_lost for a in world.agents):
            self._agent_trouble_until = world.now + 2 * AGENT_READ_SECONDS
        for job_id in sorted(self._seen):  # in one order whatever the hash seed
            job = world.db.jobs.get(job_id)
            if job is None:
                self._violate(f"lost: job {job_id} vanished from the router DB")
                continue
            ended = self._ended.get(job_id)
            if ended is not None and ended != job:
                self._violate(f"an ended job changed: {ended.status} -> {job.status} ({job.job_id})")
            if not job.active:
                self._ended[job_id] = job
                self._diverged.pop(job_id, None)
                self._hanging.pop(job_id, None)
                continue
            if job.status is not JobStatus.STOPPING and not self.wants(job):
                self._detection(job, seconds, healthy=healthy)
            self._hang(job, seconds, healthy=agents_heard)

    def _detection(self, job: JobRecord, seconds: float, *, healthy: bool) -> None:
        allowed = max(self._allowed.get(job.job_id, 0.0), self._allowance(job))
        self._allowed[job.job_id] = allowed
        if not healthy:
            return
        self._diverged[job.job_id] = waited = self._diverged.get(job.job_id, 0.0) + seconds
        if waited > self.detect_bound + allowed:
            self._violate(
                f"late stop: {job.job_id} unwanted by Airflow for {waited:.1f} s, still {job.status}"
            )

    def _hang(self, job: JobRecord, seconds: float, *, healthy: bool) -> None:
        agent = self.world.agent[job.agent_id]
        on_agent = agent.jobs.get(job.job_id)
        answering = not (agent.paused or agent.requests_lost or agent.answers_lost)
        running = on_agent is not None and on_agent.status is AgentJobStatus.RUNNING
        # Active here and ended or unknown there; or a stop decided here that a running process
        # there never gets.
        if (running and job.status is not JobStatus.STOPPING) or not (healthy and answering):
            return
        self._hanging[job.job_id] = waited = self._hanging.get(job.job_id, 0.0) + seconds
        # A stop sent while its agent was silent waits out its call (the stop's timeout, then a
        # backoff) before the next attempt hears the agent again.
        extra = STOP_TIMEOUT + STOP_BACKOFF if job.status is JobStatus.STOPPING else 0.0
        if self.world.now < self._agent_trouble_until:
            extra += 2 * AGENT_READ_SECONDS
        if waited > self.hang_bound + extra:
            said = "does not know it" if on_agent is None else f"has it {on_agent.status}"
            self._violate(f"hang: {job.job_id} {job.status} in the router DB while {job.agent_id} {said}")
