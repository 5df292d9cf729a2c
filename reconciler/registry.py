"""Agents that register themselves: ``PUT /agents/{agent_id}`` on any sidecar replica.

A registration and a heartbeat are the same request (:mod:`agent_api.registration`), authenticated
by the fleet token, and written to the router DB's ``agents`` table, where the leader's
:class:`~reconciler.fleet.Fleet` reads them: liveness from the heartbeats, routing from the labels and
capacity, exactly as for an agent configured in ``[[agents]]``.

Before the first heartbeat of an agent process (a new ``instance``, or a new URL) is accepted, this
replica calls the agent back at the URL it gave: its ``/healthz`` must name the same id, and a request
carrying the fleet token must be accepted. So an agent is only registered where the sidecar can reach
it, and a typo in ``SELF_URL`` is refused at once, not found when its first stop fails. An id held by
another live agent (another URL, another instance, a heartbeat within ``lost_after_seconds``) is
refused: one agent cannot take over another's jobs while that one runs; a restarted agent (another
instance at the same URL) re-registers and keeps its jobs.

A heartbeat's ``jobs`` (what changed on the agent since its last accepted heartbeat) are recorded as
the loop's catch-up read records them (:meth:`JobService.apply_agent_reports`): an exit reaches the
router DB, and a trigger waiting on the job, without the sidecar asking. Only once they are recorded
is the heartbeat answered 200; otherwise the agent sends them again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta

import aiohttp

from agent_api.client import AgentClient, AgentError
from agent_api.protocol import JobInfo
from agent_api.registration import Heartbeat
from reconciler.config import FleetConfig
from reconciler.job_service import Refused
from reconciler.metrics import Metrics
from router_db import AgentConflict, AgentRecord, RouterDB
from servicekit.credentials import Secret

log = logging.getLogger("reconciler.registry")

VERIFY_TIMEOUT_SECONDS = 5.0  # the call back to a registering agent


class Registry:
    def __init__(
        self,
        *,
        db: RouterDB,
        token: Secret[str],
        static_ids: Collection[str],
        config: FleetConfig,
        metrics: Metrics,
        record_jobs: Callable[[str, Sequence[JobInfo]], Awaitable[int]] | None = None,
    ) -> None:
        self._db = db
        self._record_jobs = record_jobs
        self._token = token  # what the sidecar sends to registered agents
        self._static = frozenset(static_ids)
        self._config = config
        self._metrics = metrics
        self._verified: dict[str, tuple[str, str]] = {}  # agent id -> (instance, url) called back here
        self._session: aiohttp.ClientSession | None = None

    @property
    def lost_after_seconds(self) -> float:
        return self._config.lost_after_seconds

    async def heartbeat(self, agent_id: str, beat: Heartbeat) -> AgentRecord:
        """Record the agent's registration or heartbeat; :class:`Refused` says why not."""
        try:
            record = await self._accept(agent_id, beat)
        except Refused as exc:
            self._metrics.heartbeats.labels("refused").inc()
            log.warning(
                "registration of agent %s refused: %s",
                agent_id,
                exc,
                extra={"agent_id": agent_id, "action": "agent_refused", "url": beat.url},
            )
            raise
        self._metrics.heartbeats.labels("accepted").inc()
        return record

    async def _accept(self, agent_id: str, beat: Heartbeat) -> AgentRecord:
        if agent_id in self._static:
            raise Refused(409, f"agent {agent_id} is configured in [[agents]]: it cannot also register")
        first = self._verified.get(agent_id) != (beat.instance, beat.url)
        if first:
            await self._call_back(agent_id, beat.url)
        now = datetime.now(UTC)
        record = AgentRecord(
            agent_id=agent_id,
            url=beat.url,
            labels=beat.labels,
            max_jobs=beat.max_jobs,
            jobs_running=beat.jobs_running,
            version=beat.version,
            draining=beat.draining,
            instance=beat.instance,
            registered_at=now,
            last_heartbeat_at=now,
            heartbeat_seconds=beat.heartbeat_seconds,
        )
        alive_after = now - timedelta(seconds=self._config.lost_after_seconds)
        try:
            stored = await asyncio.to_thread(self._db.heartbeat_agent, record, alive_after=alive_after)
        except AgentConflict as exc:
            held = exc.existing
            raise Refused(
                409,
                f"agent id {agent_id} is held by a live agent at {held.url} (last heartbeat "
                f"{held.last_heartbeat_at.isoformat(timespec='seconds')}); it can be taken once that one "
                f"is silent for lost_after_seconds={self._config.lost_after_seconds:g}",
            ) from None
        if beat.unreadable_jobs:
            log.warning(
                "agent %s sent %d job(s) this sidecar cannot read; left to the catch-up read",
                agent_id,
                beat.unreadable_jobs,
                extra={"agent_id": agent_id},
            )
        if beat.jobs and self._record_jobs is not None:
            try:
                await self._record_jobs(agent_id, beat.jobs)
            except Exception as exc:  # the router DB is down: the agent sends them again
                raise Refused(
                    503, f"the jobs' changes could not be recorded ({type(exc).__name__})"
                ) from None
        if beat.leaving:
            self._verified.pop(agent_id, None)
            gone = await asyncio.to_thread(self._db.leave_agent, agent_id, beat.instance)
            log.info(
                "agent %s leaves%s",
                agent_id,
                "" if gone else ", still holding active jobs: kept until they end or it is lost",
                extra={"agent_id": agent_id, "action": "agent_left"},
            )
            return stored
        if first:
            self._verified[agent_id] = (beat.instance, beat.url)
            log.info(
                "agent %s registered at %s",
                agent_id,
                beat.url,
                extra={"agent_id": agent_id, "action": "agent_registered", "url": beat.url},
            )
        return stored

    async def _call_back(self, agent_id: str, url: str) -> None:
        """The agent at ``url`` is ``agent_id`` and takes the fleet token, or :class:`Refused` (422)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            # Who answers is asked without a token: a mistyped address must not receive the fleet's.
            anonymous = AgentClient(
                url,
                "",
                session=self._session,
                timeout=VERIFY_TIMEOUT_SECONDS,
                ca_file=self._config.registration_ca_file or None,
            )
            client = AgentClient(
                url,
                self._token.current(),
                session=self._session,
                timeout=VERIFY_TIMEOUT_SECONDS,
                ca_file=self._config.registration_ca_file or None,
            )
            answer = await anonymous.health()
            if answer.get("agent_id") != agent_id:
                said = answer.get("agent_id")
                named = f"{said[:200]!r}" if isinstance(said, str) else "no agent_id"
                raise Refused(422, f"the agent at {url} answers as {named}, not {agent_id!r}")
            await client.jobs("QUEUED")  # the fleet token is accepted there
        except (AgentError, ValueError) as exc:
            raise Refused(422, f"the sidecar cannot use {url} for agent {agent_id}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
