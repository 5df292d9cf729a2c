"""The configured agents: one :class:`AgentClient` each, and routing of new jobs to them.

The token sent to an agent is asked of its :class:`Secret` at each call: a token file rotated while
the sidecar runs applies to the next call. The fleet's liveness guards the pool (:class:`Guard`, which
:class:`~reconciler.fleet.liveness.Fleet` installs as it is built): nothing at all is sent to an agent
while it says why not (another agent answers at its URL), so a stop or a job meant for one agent never
reaches another; new jobs avoid lost agents; routing counts each agent's drain flag and job limit.

An active job whose agent is in neither ``[[agents]]`` nor the router DB's registered agents (while
registration is on) can never be asked about or stopped again: the loop ends it with
:func:`unconfigured_transition` rather than leave its task waiting forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import aiohttp

from agent_api.client import AgentClient, AgentUnavailable, Transport
from reconciler.config import AgentEntry
from reconciler.fleet.routing import Candidate, Capacity, choose, no_capacity
from router_db import JobRecord, JobStatus, Transition
from servicekit.credentials import Secret


class NoAgent(LookupError):
    """No configured agent matches the requested route."""


def unconfigured_reason(agent_id: str) -> str:
    return f"agent {agent_id} is no longer configured (not in [[agents]] and not registered)"


def unconfigured_transition(job: JobRecord) -> Transition:
    """How an active job of an agent no longer configured ends: FAILED, or a STOPPING one with the
    status chosen when its stop was decided. Only from the status it was read in: a job that moved
    meanwhile is judged again next cycle."""
    reason = unconfigured_reason(job.agent_id)
    if job.status is JobStatus.STOPPING:
        status, reason = job.stop_status or JobStatus.FAILED, f"{job.reason}; {reason}"
    else:
        status = JobStatus.FAILED
    return Transition.finish(job.job_id, status, None, reason, expect=job.status)


class NoCapacity(LookupError):
    """Every agent the route allows is lost, draining or full; the message names each and why."""


class WrongAgent(AgentUnavailable):
    """Another agent answers at the agent's URL: nothing is sent there until the right one answers.
    Retryable like any unavailable agent: a stop stays pending, a job is not started."""


class Guard(Protocol):
    """What the fleet's liveness says of each agent, for the pool to act on."""

    def avoids(self, agent_id: str) -> bool:
        """Whether new jobs avoid it (lost, or another agent answers at its URL)."""
        ...

    def refusal(self, agent_id: str) -> str | None:
        """Why nothing may be sent to it now (None: it may)."""
        ...

    def capacity(self, agent_id: str) -> Capacity:
        """Its drain flag and job limit as last heard."""
        ...


class AgentPool:
    def __init__(
        self,
        entries: Sequence[AgentEntry],
        tokens: Mapping[str, str | Secret[str]],
        *,
        timeout: float,
        stop_timeout: float,
        transport: Transport | None = None,
    ) -> None:
        self._entries = {e.id: e for e in entries}
        self._tokens = {agent_id: t if isinstance(t, Secret) else Secret(t) for agent_id, t in tokens.items()}
        self._timeout = timeout
        self._stop_timeout = stop_timeout
        self._transport = transport  # None: aiohttp (the core's simulation passes its own)
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # "jobs" and "health" pools
        self._clients: dict[tuple[str, str], tuple[str, AgentClient]] = {}  # with the token it sends
        self._turn = 0
        self._picked: dict[str, int] = {}  # agent id -> the turn it was last chosen at
        self._guard: Guard | None = None  # none: a pool no fleet watches (a bench, a test)

    def guarded_by(self, guard: Guard) -> None:
        """The fleet's liveness, from now on (one per pool)."""
        if self._guard is not None and self._guard is not guard:
            raise RuntimeError("this agent pool is guarded already")
        self._guard = guard

    def refuse(self, agent_id: str) -> str | None:
        """Why nothing may be sent to the agent now (another agent answers at its URL), or None."""
        return self._guard.refusal(agent_id) if self._guard is not None else None

    def capacity(self, agent_id: str) -> Capacity:
        """Its drain flag and job limit as last heard."""
        return self._guard.capacity(agent_id) if self._guard is not None else Capacity()

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def put(self, entry: AgentEntry, token: Secret[str]) -> None:
        """Add or update an agent (a registered one, as its heartbeats say): a new URL, CA or token
        takes effect at the next call."""
        old = self._entries.get(entry.id)
        if old == entry and self._tokens.get(entry.id) is token:
            return
        if old is not None and (old.url, old.ca_file) != (entry.url, entry.ca_file):
            for pool in ("jobs", "health"):
                self._clients.pop((pool, entry.id), None)
        self._entries[entry.id] = entry
        self._tokens[entry.id] = token

    def remove(self, agent_id: str) -> None:
        """An agent that left (a registered one forgotten): nothing is sent to it any more."""
        self._entries.pop(agent_id, None)
        self._tokens.pop(agent_id, None)
        self._picked.pop(agent_id, None)
        for pool in ("jobs", "health"):
            self._clients.pop((pool, agent_id), None)

    def url(self, agent_id: str) -> str:
        return self._entries[agent_id].url

    def labels(self, agent_id: str) -> list[str]:
        return list(self._entries[agent_id].labels)

    def client(self, agent_id: str) -> AgentClient:
        """The agent's client for jobs: one connection pool for all agents; per-request timeouts
        come from each client. Raises :class:`WrongAgent` while another agent answers at its URL."""
        refusal = self.refuse(agent_id) if agent_id in self._entries else None
        if refusal is not None:
            raise WrongAgent(refusal)
        return self._pooled("jobs", agent_id)

    def prober(self, agent_id: str) -> AgentClient:
        """A client for health checks, on connections of its own: requests queued for a busy
        agent's shared pool must not make a healthy agent look silent. Never refused: the health
        check is how the right agent is found at the URL again."""
        return self._pooled("health", agent_id)

    def _pooled(self, pool: str, agent_id: str) -> AgentClient:
        if agent_id not in self._entries:
            raise NoAgent(f"unknown agent {agent_id!r}")
        token = self._tokens[agent_id].current()
        cached = self._clients.get((pool, agent_id))
        if cached is not None and cached[0] == token:
            return cached[1]
        # First use, or the token changed (its file was rotated): a client sending the new one, on
        # the same connections.
        if pool not in self._sessions and self._transport is None:
            self._sessions[pool] = aiohttp.ClientSession()
        entry = self._entries[agent_id]
        try:
            client = AgentClient(
                entry.url,
                token,
                session=self._sessions.get(pool),
                timeout=self._timeout,
                stop_timeout=self._stop_timeout,
                ca_file=entry.ca_file or None,
                transport=self._transport,
            )
        except ValueError as exc:  # the CA bundle went missing since the start: retry later
            raise AgentUnavailable(f"agent {agent_id}: {exc}") from None
        self._clients[pool, agent_id] = (token, client)
        return client

    def eligible(self, *, agent_id: str | None, labels: Iterable[str]) -> list[str]:
        """The agents a new job may go to: the one named, or those carrying all ``labels``."""
        if agent_id is not None:
            if agent_id not in self._entries:
                raise NoAgent(f"unknown agent {agent_id!r}")
            return [agent_id]
        wanted = set(labels)
        matching = sorted(e.id for e in self._entries.values() if wanted <= set(e.labels))
        if not matching:
            raise NoAgent(f"no agent has labels {sorted(wanted)}")
        return matching

    def limited(self, agent_ids: Iterable[str]) -> bool:
        """Whether any of these agents reported a job limit: only then do their loads matter."""
        return any(self.capacity(a).max_jobs for a in agent_ids)

    def route(
        self,
        *,
        agent_id: str | None,
        labels: Iterable[str],
        load: Mapping[str, int] | None = None,
        refused: Mapping[str, str] | None = None,
    ) -> str:
        """The agent for a new job (see :mod:`reconciler.fleet.routing`): the named one, or the one with the
        most free slots among those carrying all labels. ``load``: active jobs per agent (the router
        DB's); ``refused``: agents that refused this very job, and their words.

        Raises :class:`NoAgent` when the route names no configured agent, :class:`NoCapacity` when
        no eligible agent may take the job. A named agent that is lost or answered by another agent
        is returned all the same: the caller answers that case itself (503, as before capacities)."""
        labels = list(labels)
        candidates = [
            Candidate(
                a,
                blocked=self._blocked(a),
                capacity=self.capacity(a),
                active=(load or {}).get(a, 0),
                last_pick=self._picked.get(a, 0),
                refused=(refused or {}).get(a),
            )
            for a in self.eligible(agent_id=agent_id, labels=labels)
        ]
        if agent_id is not None and candidates[0].blocked is not None and candidates[0].refused is None:
            return agent_id
        chosen = choose(candidates)
        if chosen is None:
            raise NoCapacity(no_capacity(candidates, labels=labels, pinned=agent_id is not None))
        # Taken now, before any await: concurrent submissions see this agent's turn as used.
        self._turn += 1
        self._picked[chosen] = self._turn
        return chosen

    def _blocked(self, agent_id: str) -> str | None:
        if self.refuse(agent_id) is not None:
            return "wrong_identity"
        return "lost" if self._guard is not None and self._guard.avoids(agent_id) else None

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        self._clients.clear()
