"""Agents as the sidecar meets them over HTTP: the real client's requests, answered from simulated
job tables (the agent API's own JSON types), through a :class:`agent_api.client.Transport`.

An agent can be paused (requests get no answer until their timeout), cut off one way (requests never
arrive, or arrive and are carried out but the answer is lost), restarted (its jobs run on, adopted,
and its change cursor starts over), or recreated with an empty home (its jobs are gone with their
processes, and it knows none of them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

import aiohttp

from agent.errors import UnknownJob
from agent_api.protocol import AgentJobStatus, JobChanges, JobInfo, StopAction, StopResult


@dataclass
class SimJob:
    job_id: str
    ends_at: float  # world time its process exits by itself
    rc: int  # what it exits with then
    status: AgentJobStatus = AgentJobStatus.RUNNING
    exit_rc: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    changed: int = 0  # the agent's change counter when it last changed

    def info(self) -> JobInfo:
        return JobInfo(
            self.job_id,
            self.status,
            4242 if self.status is AgentJobStatus.RUNNING else None,
            self.exit_rc,
            self.started_at,
            self.finished_at,
            self.reason,
        )


@dataclass
class SimAgent:
    agent_id: str
    url: str
    wall: Callable[[], datetime]  # the VM's clock
    jobs: dict[str, SimJob] = field(default_factory=dict)
    instance: int = 1  # the process: a restart starts another, and its cursors
    counter: int = 0
    # Faults the world sets: requests lost on the way (no answer), answers lost on the way back
    # (carried out, no answer), or the whole VM paused (neither).
    requests_lost: bool = False
    answers_lost: bool = False
    paused: bool = False
    # What a stop request arrived for, and when: the no-false-stop check reads it.
    on_stop: Callable[[str], None] = lambda job_id: None

    def start(self, job_id: str, *, now: float, duration: float, rc: int) -> None:
        self.counter += 1
        self.jobs[job_id] = SimJob(job_id, now + duration, rc, started_at=self.wall(), changed=self.counter)

    def tick(self, now: float) -> None:
        """Processes that reached their end exit."""
        for job in self.jobs.values():
            if job.status is AgentJobStatus.RUNNING and now >= job.ends_at:
                self._finish(job, job.rc, None)

    def running(self) -> list[str]:
        return [j.job_id for j in self.jobs.values() if j.status is AgentJobStatus.RUNNING]

    def restart(self, *, empty_home: bool) -> None:
        self.instance += 1
        if empty_home:
            self.jobs.clear()  # a VM recreated: its processes died with it, its state is gone

    def _finish(self, job: SimJob, rc: int, reason: str | None) -> None:
        self.counter += 1
        job.status = AgentJobStatus.SUCCEEDED if rc == 0 else AgentJobStatus.FAILED
        job.exit_rc, job.finished_at, job.reason, job.changed = rc, self.wall(), reason, self.counter

    # --- the HTTP API ----------------------------------------------------------------------------------

    def answer(self, method: str, path: str, params: Mapping[str, str], body: object) -> tuple[int, object]:
        if method == "GET" and path in ("/health", "/healthz"):
            return 200, {"status": "ok", "agent_id": self.agent_id, "jobs_running": len(self.running())}
        if method == "GET" and path == "/jobs" and "changed_since" in params:
            return 200, self._changes(params["changed_since"])
        if method == "GET" and path.startswith("/jobs/"):
            job_id = path.removeprefix("/jobs/")
            job = self.jobs.get(job_id)
            return (200, job.info().to_json()) if job else (404, {"error": UnknownJob(job_id).message})
        if method == "POST" and path.startswith("/stop/"):
            job_id = path.removeprefix("/stop/")
            job = self.jobs.get(job_id)
            self.on_stop(job_id)
            if job is None:  # a tombstone: a /run arriving later is refused
                self.counter += 1
                job = self.jobs[job_id] = SimJob(job_id, 0.0, -1, changed=self.counter)
                self._finish(job, -1, "stopped before it started")
            if job.status is AgentJobStatus.RUNNING:
                reason = body.get("reason") if isinstance(body, dict) else None
                self._finish(job, -15, f"stopped: {reason}")
                action = StopAction.TERMINATED
            else:
                action = StopAction.ALREADY_FINISHED
            result = StopResult(True, "stopped", job.status, job.exit_rc, action, "SIGTERM", job.reason)
            return 200, result.to_json()
        return 404, {"error": f"no route {method} {path}"}

    def _changes(self, cursor: str) -> dict[str, object]:
        mine, _, seen = cursor.partition(".")
        full = mine != str(self.instance) or not seen.isdigit()
        since = 0 if full else int(seen)
        changed = sorted(
            (j for j in self.jobs.values() if full or j.changed > since), key=lambda j: j.changed
        )
        return JobChanges(tuple(j.info() for j in changed), f"{self.instance}.{self.counter}", full).to_json()


class SimNetwork:
    """Carries the client's requests to the agents by URL (:class:`agent_api.client.Transport`)."""

    def __init__(self) -> None:
        self.agents: dict[str, SimAgent] = {}  # by URL
        self.latency: Callable[[str], float] = lambda url: 0.0

    async def __call__(
        self,
        method: str,
        url: str,
        *,
        body: object,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int,
    ) -> tuple[int, Mapping[str, str], bytes]:
        parts = urlsplit(url)
        agent = self.agents.get(f"{parts.scheme}://{parts.netloc}")
        if agent is None:
            raise aiohttp.ClientConnectionError("connection refused")
        delay = self.latency(agent.agent_id)
        if agent.paused or agent.requests_lost:
            await asyncio.sleep(timeout)
            raise TimeoutError
        if delay:
            await asyncio.sleep(min(delay, timeout))
        status, answer = agent.answer(method, parts.path, dict(params or {}), body)
        if agent.answers_lost or agent.paused or delay >= timeout:  # carried out, never heard of
            await asyncio.sleep(max(0.0, timeout - delay))
            raise TimeoutError
        return status, {"Content-Type": "application/json"}, json.dumps(answer).encode()
