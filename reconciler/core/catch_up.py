"""The catch-up with agents: one ``changed_since`` request per agent per round, whatever the number of
its jobs, instead of one status read per job.

Each agent's cursor (what it answered last) is kept in memory: a new term, or an agent restarted,
starts from none, and the agent then answers ``full`` (every job it knows). An agent whose client
raises :class:`ChangesUnsupported` (an older agent) is asked again only after
:data:`RETRY_UNSUPPORTED_SECONDS` (it may have been upgraded); meanwhile the loop's rolling sweep
reads its jobs one by one, as before the change feed existed. An agent that does not answer keeps
its cursor: the next cycle asks from there, and nothing it reported is lost; one that refuses the
cursor (it cannot have given it) is asked in full next time, and so is one whose full answer left a
doubt unsettled (a running job missing from it that the agent did not certainly deny: see
:mod:`reconciler.core.agent_reports`). An agent no longer in the pool (taken out of ``[[agents]]``, or a
registered one forgotten) is not asked: the loop ends its jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from agent_api.client import AgentError, AgentRejected, ChangesUnsupported, JobInfo
from reconciler.core.agent_reports import Recorded
from reconciler.fleet.agents import AgentPool, NoAgent

log = logging.getLogger(__name__)

RETRY_UNSUPPORTED_SECONDS = 300.0  # an agent without the change feed is asked again this often
READ_TIMEOUT_SECONDS = 5.0  # a slow agent waits for the next cycle, it does not hold this one up


Apply = Callable[[str, Sequence[JobInfo], bool], Awaitable[Recorded]]  # agent id, jobs, full


@dataclass
class CatchUp:
    agents: AgentPool
    apply: Apply
    clock: Callable[[], float] = time.monotonic
    cursors: dict[str, str] = field(default_factory=dict)
    _unsupported_until: dict[str, float] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def restart(self) -> None:
        """A new term: what an earlier one heard may be stale, so every agent answers in full."""
        self.cursors.clear()
        self._unsupported_until.clear()

    def supported(self, agent_id: str) -> bool:
        """False while the agent is known to lack the change feed (its jobs are swept one by one)."""
        return self.clock() >= self._unsupported_until.get(agent_id, float("-inf"))

    async def run(self, agent_ids: Sequence[str]) -> list[str]:
        """Ask each agent (at once, one request each) and record what it reports; returns the
        agents that lack the change feed. One round at a time: each agent's cursor moves forward
        only."""
        async with self._lock:
            asked = [agent_id for agent_id in agent_ids if self.supported(agent_id)]
            await asyncio.gather(*(self._one(agent_id) for agent_id in asked))
        return [agent_id for agent_id in agent_ids if not self.supported(agent_id)]

    async def _one(self, agent_id: str) -> None:
        try:
            client = self.agents.client(agent_id)
            jobs, cursor, full = await asyncio.wait_for(
                client.changed_since(self.cursors.get(agent_id)), READ_TIMEOUT_SECONDS
            )
        except ChangesUnsupported:
            if agent_id not in self._unsupported_until:
                log.info("agent %s has no change feed; its jobs are read one by one", agent_id)
            self._unsupported_until[agent_id] = self.clock() + RETRY_UNSUPPORTED_SECONDS
            return
        except AgentRejected:
            self.cursors.pop(agent_id, None)  # a cursor it cannot have given (a restart): ask in full
            return
        except (AgentError, TimeoutError):
            return  # unreachable: the cursor stays, the next cycle asks from there
        except NoAgent:
            return  # no longer configured nor registered: the loop ends its jobs
        self._unsupported_until.pop(agent_id, None)
        try:
            recorded = await self.apply(agent_id, jobs, full)
        except Exception as exc:  # the router DB failed: ask from the same cursor next cycle
            log.error("agent %s: recording its changes failed: %s", agent_id, type(exc).__name__)
            return
        if recorded.settled:
            self.cursors[agent_id] = cursor
        else:  # a missing job the agent did not certainly deny: only a full answer shows it again
            self.cursors.pop(agent_id, None)
