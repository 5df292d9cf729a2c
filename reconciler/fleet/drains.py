"""A drain flag asked of the sidecar (``POST /agents/{id}/drain``) is its own until the agent's answer
agrees: it routes around the agent at once, even one that cannot be reached, and is sent again while
an agent's answers disagree (every ``DRAIN_RESEND_SECONDS``). The agent keeps the flag across its
restarts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from agent_api.client import AgentError
from reconciler.fleet.agent_state import AgentState, Heard, TrackedAgent
from reconciler.fleet.agents import AgentPool

DRAIN_RESEND_SECONDS = 30.0  # a drain flag the agent's answers contradict is sent again this often


class DrainDelivery:
    def __init__(self, pool: AgentPool, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._clock = clock

    def due(self, agent: TrackedAgent, now: float) -> bool:
        """Send the sidecar's drain flag again: the agent answers, disagrees, and can say (an older
        agent, which reports no flag, is only routed around)."""
        return (
            agent.state is AgentState.LIVE
            and agent.heard.draining is not None
            and agent.heard.draining != agent.drain_wanted
            and not agent.sending_drain
            and now >= agent.next_drain_send
        )

    async def send(self, agent: TrackedAgent) -> Heard:
        """POST /drain or /undrain as the flag wanted now says; what the agent answered (not applied:
        the fleet decides what it hears of it)."""
        wanted = bool(agent.drain_wanted)
        agent.sending_drain = True
        agent.next_drain_send = self._clock() + DRAIN_RESEND_SECONDS
        try:
            client = self._pool.client(agent.id)
            answer = await (client.drain(agent.drain_request) if wanted else client.undrain())
        finally:
            agent.sending_drain = False
        if answer.agent_id != agent.id:  # the address now reaches another agent
            raise AgentError(f"the agent at {self._pool.url(agent.id)} answered as {answer.agent_id[:200]!r}")
        news = replace(
            agent.heard,
            draining=answer.draining,
            jobs_running=answer.jobs_running,
            maintenance=answer.maintenance,
        )
        return news
