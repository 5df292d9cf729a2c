"""Which agent takes a new job: a pure choice from what the sidecar knows of each eligible agent.

An agent takes no new job while it is lost or another agent answers at its URL (its liveness), while
it drains, or while it is full: the router DB's active jobs there (what the sidecar routed and has not
seen end) reached the ``max_jobs`` it last reported. Among the others the one with the most free slots
wins (an agent without a limit has infinitely many); agents tied on free slots take turns, the one
chosen longest ago first, so concurrent submissions spread instead of piling onto one agent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

WHEN_FULL = ("wait", "refuse")  # [fleet] when_full: answer 503 (the operator retries) or 409 (fails at once)


@dataclass(frozen=True)
class Capacity:
    """An agent's last word on taking work (its health answer, or the sidecar's own drain flag)."""

    draining: bool = False
    max_jobs: int | None = None  # None: not reported (an older agent); None and 0 both mean no limit


@dataclass(frozen=True)
class Candidate:
    """One eligible agent, as routing sees it."""

    agent_id: str
    blocked: str | None = None  # why its liveness forbids new work: "lost", "wrong_identity"
    capacity: Capacity = Capacity()
    active: int = 0  # the router DB's active jobs on it
    last_pick: int = 0  # when it was last chosen (a counter; 0: never)
    refused: str | None = None  # the agent's own refusal of this very job (its /run answered 503)


def free_slots(candidate: Candidate) -> float:
    """Jobs it may still take: infinite without a limit, never below 0."""
    limit = candidate.capacity.max_jobs
    return math.inf if not limit else max(0, limit - candidate.active)


def unavailable(candidate: Candidate) -> str | None:
    """Why the agent takes no new job now (None: it may), in the words of the no-capacity answer."""
    if candidate.refused is not None:
        return f"refused ({candidate.refused})"
    if candidate.blocked is not None:
        return candidate.blocked
    if candidate.capacity.draining:
        return "draining"
    if free_slots(candidate) <= 0:
        return f"full {candidate.active}/{candidate.capacity.max_jobs}"
    return None


def choose(candidates: Sequence[Candidate]) -> str | None:
    """The agent with the most free slots (turns among equals), or None when none may take the job."""
    open_ = [c for c in candidates if unavailable(c) is None]
    if not open_:
        return None
    most = max(free_slots(c) for c in open_)
    tied = [c for c in open_ if free_slots(c) == most]
    return min(tied, key=lambda c: (c.last_pick, c.agent_id)).agent_id


def no_capacity(candidates: Sequence[Candidate], *, labels: Iterable[str], pinned: bool) -> str:
    """The answer's ``error`` when no eligible agent has room: each agent and why not."""
    why = ", ".join(f"{c.agent_id} {unavailable(c) or 'has room'}" for c in candidates)
    if pinned:
        return f"no capacity: agent_id {candidates[0].agent_id}: {why}"
    return f"no capacity: {len(candidates)} agent(s) carry labels {sorted(set(labels))}: {why}"


def label_set(labels: Iterable[str]) -> str:
    """An agent's labels as one metric label value: sorted, comma-joined; ``(none)`` for none. Bounded by
    the configuration (never a request's labels, never agent ids)."""
    return ",".join(sorted(set(labels))) or "(none)"
