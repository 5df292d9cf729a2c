"""The router DB, in memory, on the world's clock: the subset of :class:`router_db.RouterDB` the core
calls, with the same compare-and-set rules (:func:`router_db.transitions.allowed`, ``expect``).

tests/test_simulation.py runs the same operations on this and on the real RouterDB (SQLite) and
requires the same answers, so the simulation cannot drift from what production stores.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime

from router_db import EventRecord, JobRecord, JobStatus, NewJob, TaskInstanceKey, Transition
from router_db.records import AgentRecord
from router_db.transitions import OneTransition, allowed


class SimRouterDB(OneTransition):
    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock  # the database server's clock (every writer's "now")
        self.jobs: dict[str, JobRecord] = {}
        self.events_by_job: dict[str, list[EventRecord]] = {}
        self._next_id = 0
        self.fail: Callable[[str], Exception | None] = lambda operation: None  # the world's outages
        # Told of every change applied: the job before and after, and who asked.
        self.on_apply: Callable[[JobRecord, JobRecord, str], None] = lambda before, after, source: None

    def _check(self, operation: str) -> None:
        problem = self.fail(operation)
        if problem is not None:
            raise problem

    def now(self) -> datetime:
        self._check("now")
        return self._clock()

    def ping(self) -> None:
        self._check("ping")

    # --- reads -------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        self._check("get")
        return self.jobs.get(job_id)

    def get_many(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        self._check("get_many")
        return {job_id: self.jobs[job_id] for job_id in job_ids if job_id in self.jobs}

    def find(self, key: TaskInstanceKey, ti_identity: str = "") -> JobRecord | None:
        self._check("find")
        return next((j for j in self.jobs.values() if j.key == key and j.ti_identity == ti_identity), None)

    def find_latest(self, *, dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> JobRecord | None:
        self._check("find_latest")
        tries = [j for j in self.jobs.values() if _path(j) == (dag_id, task_id, run_id, map_index)]
        return max(tries, key=lambda j: (j.key.try_number, j.created_at), default=None)

    def active_tries(self, *, dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> list[JobRecord]:
        self._check("active_tries")
        return [
            j for j in self.jobs.values() if j.active and _path(j) == (dag_id, task_id, run_id, map_index)
        ]

    def active(self, *, agent_id: str | None = None) -> list[JobRecord]:
        self._check("active")
        return [j for j in self.jobs.values() if j.active and agent_id in (None, j.agent_id)]

    def active_counts(self) -> dict[str, int]:
        self._check("active_counts")
        return dict(Counter(j.agent_id for j in self.jobs.values() if j.active))

    def changes_since(self, moment: datetime | None) -> tuple[datetime, list[JobRecord]]:
        self._check("changes_since")
        began = self._clock()
        if moment is None:
            return began, []
        return began, [j for j in self.jobs.values() if j.updated_at >= moment]

    def events(self, job_id: str) -> list[EventRecord]:
        self._check("events")
        return list(self.events_by_job.get(job_id, ()))

    def registered_agents(self) -> list[AgentRecord]:
        self._check("registered_agents")
        return []  # the simulated fleet is [[agents]] only

    def registered_agent(self, agent_id: str) -> AgentRecord | None:
        self._check("registered_agent")
        return None

    # --- writes ------------------------------------------------------------------------------------

    def submit(self, new: NewJob, *, source: str = "submit") -> tuple[JobRecord, bool]:
        self._check("submit")
        existing = next(
            (j for j in self.jobs.values() if j.key == new.key and j.ti_identity == new.ti_identity), None
        )
        if existing is not None:
            return existing, False
        self._next_id += 1
        now = self._clock()
        job = JobRecord(
            job_id=f"job{self._next_id:05d}",
            key=new.key,
            agent_id=new.agent_id,
            command=new.command,
            status=JobStatus.QUEUED,
            rc=None,
            reason=None,
            stop_status=None,
            created_at=now,
            updated_at=now,
            stop_requested_at=None,
            finished_at=None,
            ti_identity=new.ti_identity,
            at_most_once=new.at_most_once,
            fence_seconds=new.fence_seconds,
        )
        self.jobs[job.job_id] = job
        self.events_by_job[job.job_id] = [
            EventRecord(job.job_id, now, None, JobStatus.QUEUED, source, "submitted")
        ]
        return job, True

    def forget_unstarted(self, job_id: str, *, agent_id: str) -> bool:
        self._check("forget_unstarted")
        job = self.jobs.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED or job.agent_id != agent_id:
            return False
        del self.jobs[job_id]
        self.events_by_job.pop(job_id, None)
        return True

    def apply(self, transitions: Sequence[Transition], *, source: str) -> list[JobRecord | None]:
        self._check("apply")
        now = self._clock()
        done: dict[str, JobRecord] = {}
        for t in transitions:
            job = self.jobs.get(t.job_id)
            if (
                job is None
                or not allowed(job.status, t.new)
                or (t.expect is not None and job.status is not t.expect)
            ):
                continue
            values = t.values(now)
            if "stop_status" in values:
                values["stop_status"] = JobStatus(values["stop_status"])
            after = dataclasses.replace(job, status=t.new, reason=t.reason, updated_at=now, **values)
            self.jobs[t.job_id] = done[t.job_id] = after
            self.on_apply(job, after, source)
            self.events_by_job[t.job_id].append(
                EventRecord(t.job_id, now, job.status, t.new, source, t.reason)
            )
        # As the real one: the job as the batch left it, wherever one of its transitions applied.
        return [done.get(t.job_id) for t in transitions]


def _path(job: JobRecord) -> tuple[str, str, str, int]:
    return (job.key.dag_id, job.key.task_id, job.key.run_id, job.key.map_index)
