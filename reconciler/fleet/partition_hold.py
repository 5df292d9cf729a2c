"""Losses held back while most agents fail at once: that says more about the sidecar's own network
(DNS, a policy, a proxy) than about the agents, and ending every job in the fleet would turn the
sidecar's outage into the loss of all work. No agent is declared lost until most answer again, or
until ``[fleet] partition_hold_seconds`` have passed. Only agents that have shown they live count in
that majority: a registration never followed by a heartbeat counts in neither side, so nobody keeps
the hold up by registering agents and falling silent."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from reconciler.fleet.agent_state import AgentState, TrackedAgent, partitioned

log = logging.getLogger("reconciler.fleet.liveness")


class PartitionHold:
    def __init__(self, limit_seconds: float) -> None:
        self._limit = limit_seconds
        self.reset()

    def reset(self) -> None:
        """Nothing held back (a standby holds nothing back)."""
        self.partitioned = False
        self.held_since: float | None = None  # when a loss was first held back in this partition
        self._expired = False

    def held(self, now: float) -> None:
        """A loss was held back now."""
        if self.held_since is None:
            self.held_since = now

    def holds(self, verdicts: dict[str, AgentState], agents: Iterable[TrackedAgent], now: float) -> bool:
        """Whether losses are held back now: most agents that have shown they live, and are not lost
        already (a VM dead for an hour says nothing about a new silence), fail at once, and no loss
        has been held back for ``partition_hold_seconds`` yet."""
        limit = self._limit
        if limit <= 0:
            return False
        current = [verdicts[a.id] for a in agents if a.state is not AgentState.LOST and a.confirmed]
        failing = sum(state is not AgentState.LIVE for state in current)
        if not partitioned(failing=failing, total=len(current)):
            if self.partitioned:
                log.warning("most agents answer again: no loss is held back")
            self.partitioned, self.held_since, self._expired = False, None, False
            return False
        if not self.partitioned:
            self.partitioned = True
            log.error(
                "%d of %d agents fail their health checks at once: the sidecar itself may be cut off; no "
                "agent is declared lost until most answer again, or for partition_hold_seconds=%s after "
                "lost_after_seconds",
                failing,
                len(current),
                f"{limit:g}",
                extra={"action": "fleet_partitioned"},
            )
        if not self._expired and self.held_since is not None and now - self.held_since >= limit:
            self._expired = True  # until most answer again: a silence this long is the agents'
            log.error(
                "%d of %d agents fail at once, and losses have been held back for partition_hold_seconds=%s: "
                "they are declared lost as any silent agent is",
                failing,
                len(current),
                f"{limit:g}",
                extra={"action": "fleet_hold_expired"},
            )
        return not self._expired
