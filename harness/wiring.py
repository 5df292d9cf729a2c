"""What tests pass where the sidecar wires its parts together, when the wire does not matter to them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from reconciler.fleet.agents import AgentPool
from reconciler.fleet.routing import Capacity
from router_db import JobRecord


def nobody_waits(records: Iterable[JobRecord]) -> None:
    """A ``changed`` hook for a test whose jobs no long-poll waits on (the service passes its watch)."""


@dataclass
class SaidOfAgents:
    """The fleet's liveness as a test sets it (a :class:`reconciler.fleet.agents.Guard`)."""

    avoid: Callable[[str], bool] = lambda agent_id: False
    refuse: Callable[[str], str | None] = lambda agent_id: None
    limits: Callable[[str], Capacity] = lambda agent_id: Capacity()

    def avoids(self, agent_id: str) -> bool:
        return self.avoid(agent_id)

    def refusal(self, agent_id: str) -> str | None:
        return self.refuse(agent_id)

    def capacity(self, agent_id: str) -> Capacity:
        return self.limits(agent_id)


def said_of(pool: AgentPool) -> SaidOfAgents:
    """The pool's stand-in liveness, installed on first use."""
    guard = pool._guard  # a test's own pool
    if guard is None:
        guard = SaidOfAgents()
        pool.guarded_by(guard)
    assert isinstance(guard, SaidOfAgents), "this pool is guarded by a real fleet"
    return guard
