"""The configured agents: one :class:`AgentClient` each, and routing of new jobs to them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import aiohttp

from agent_api.client import AgentClient
from reconciler.config import AgentEntry


class NoAgent(LookupError):
    """No configured agent matches the requested route."""


class AgentPool:
    def __init__(
        self, entries: Sequence[AgentEntry], tokens: Mapping[str, str], *, timeout: float, stop_timeout: float
    ) -> None:
        self._entries = {e.id: e for e in entries}
        self._tokens = tokens
        self._timeout = timeout
        self._stop_timeout = stop_timeout
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # "jobs" and "health" pools
        self._clients: dict[tuple[str, str], AgentClient] = {}
        self._next = 0
        self.avoid: Callable[[str], bool] = lambda agent_id: False  # set by the fleet's liveness

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def client(self, agent_id: str) -> AgentClient:
        """The agent's client for jobs: one connection pool for all agents; per-request timeouts
        come from each client."""
        return self._pooled("jobs", agent_id)

    def prober(self, agent_id: str) -> AgentClient:
        """A client for health checks, on connections of its own: requests queued for a busy
        agent's shared pool must not make a healthy agent look silent."""
        return self._pooled("health", agent_id)

    def _pooled(self, pool: str, agent_id: str) -> AgentClient:
        if agent_id not in self._entries:
            raise NoAgent(f"unknown agent {agent_id!r}")
        if (pool, agent_id) not in self._clients:
            if pool not in self._sessions:
                self._sessions[pool] = aiohttp.ClientSession()
            entry = self._entries[agent_id]
            self._clients[pool, agent_id] = AgentClient(
                entry.url,
                self._tokens[agent_id],
                session=self._sessions[pool],
                timeout=self._timeout,
                stop_timeout=self._stop_timeout,
                ca_file=entry.ca_file or None,
            )
        return self._clients[pool, agent_id]

    def route(self, *, agent_id: str | None, labels: Iterable[str]) -> str:
        """The agent for a new job: the named one, or round-robin among those carrying all labels."""
        if agent_id is not None:
            if agent_id not in self._entries:
                raise NoAgent(f"unknown agent {agent_id!r}")
            return agent_id
        wanted = set(labels)
        matching = sorted(e.id for e in self._entries.values() if wanted <= set(e.labels))
        if not matching:
            raise NoAgent(f"no agent has labels {sorted(wanted)}")
        # Lost agents get no new work while another one can take it.
        matching = [a for a in matching if not self.avoid(a)] or matching
        self._next += 1
        return matching[self._next % len(matching)]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        self._clients.clear()
