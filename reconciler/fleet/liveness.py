"""Agent liveness: whether each agent lives, from its health checks or its heartbeats; never Airflow.

Each ``[[agents]]`` agent's ``/health`` is asked every ``check_interval_seconds``, in the background:
a paused or hanging agent must not hold up the loop. A registered agent is judged by its heartbeats,
read from the router DB by every replica (their ages on the router DB's clock). An agent is **lost**
once a health check *started* ``lost_after_seconds`` after its last answer has failed. Counting from
the start of a failed check (not from "now") means a sidecar that was itself paused, starved or
restarted never declares a healthy agent lost: only a check sent after the whole silence counts. A
lost agent's jobs end (:mod:`.lost_jobs`), unless most agents fail at once (:mod:`.partition_hold`);
when it answers again, and every ``orphan_sweep_seconds``, its jobs the router DB has ended are
stopped (:mod:`.orphans`).

Each health answer names the agent (``agent_id``). One naming another agent (an address reused by a
new VM, a DNS name moved, a copied configuration) is no answer from the configured agent: the state
is ``wrong_identity``, nothing is sent to that URL (:class:`~reconciler.fleet.agents.WrongAgent`), and
the silence of the configured agent counts on as it would for a failed check, so its jobs end by the
same lost rule, never sooner. Each answer also says how much work the agent takes (``max_jobs``,
``draining``, ``jobs_running``, ``version``), kept for routing (:mod:`.routing`) and ``GET /agents``;
a drain asked of the sidecar is delivered by :mod:`.drains`. The fleet guards the agent pool
(:class:`~reconciler.fleet.agents.Guard`) with all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from agent_api.client import AgentError
from agent_api.fencing import FenceTerms
from agent_api.maintenance import DrainRequest, Maintenance
from agent_api.protocol import ProtocolError
from reconciler.config import AgentEntry, FleetConfig
from reconciler.fleet.agent_state import (
    MAX_VERSION_CHARS,
    MISSED_HEARTBEATS,
    TICK_GAP_SECONDS,
    AgentReport,
    AgentState,
    DrainNotDelivered,
    Heard,
    TrackedAgent,
    agent_state,
    fence_margin,
    heard,
    identity_problem,
    lost_reason,
    maintenance_of,
    unwell_of,
)
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.drains import DrainDelivery
from reconciler.fleet.fencing import fence_problem
from reconciler.fleet.lost_jobs import LostJobs
from reconciler.fleet.orphans import OrphanSweep
from reconciler.fleet.partition_hold import PartitionHold
from reconciler.fleet.routing import Capacity, label_set
from reconciler.fleet.versions import minimum, too_old
from reconciler.metrics import Metrics
from router_db import AgentRecord, JobRecord, RouterDB
from servicekit.credentials import Secret

log = logging.getLogger("reconciler.fleet.liveness")

REGISTERED_READ_SECONDS = 1.0  # how often every replica reads the registered agents from the router DB
FORGET_CHECK_SECONDS = 60.0  # how often long-silent registered agents are looked for


class Fleet:
    def __init__(
        self,
        *,
        db: RouterDB,
        agents: AgentPool,
        metrics: Metrics,
        config: FleetConfig,
        changed: Callable[[Iterable[JobRecord]], object],  # told of the jobs it ended: their long-polls wake
        clock: Callable[[], float] = time.monotonic,
        registered_token: Secret[str] | None = None,  # sent to registered agents; None: registration off
    ) -> None:
        self._db = db
        self._registered_token = registered_token
        self._registered_lock = asyncio.Lock()
        self._next_forget = 0.0
        self._listening_since = clock()  # heartbeats count from here: a start, a term, a pause
        # The router DB's time at the last read of the registered agents, and this clock's then: a
        # database clock stepped forward would age every heartbeat at once.
        self._db_clock: tuple[datetime, float] | None = None
        self._last_tick = clock()
        self._pool = agents
        self._orphans = OrphanSweep(db, agents, metrics)
        self._drains = DrainDelivery(agents, clock)
        self._metrics = metrics
        self._config = config
        self._clock = clock
        self._min_version = minimum(config.min_agent_version)
        self._started_at = datetime.now(UTC)
        self._lost_jobs = LostJobs(db, metrics, config, changed=changed, started_at=self._started_at)
        # Most agents fail at once (a partition, maybe the sidecar's own), since when a loss has been
        # held back because of it, and whether that has lasted partition_hold_seconds already.
        self._hold = PartitionHold(config.partition_hold_seconds)
        self._leading = False  # this replica runs the fleet's ticks (health checks among them)
        self._load: dict[str, int] | None = None  # active jobs per agent (router DB), for the gauges
        self._next_load = 0.0
        now = clock()
        self._agents = {
            agent_id: TrackedAgent(agent_id, last_contact=now, next_sweep=now + config.orphan_sweep_seconds)
            for agent_id in agents.ids()
        }
        agents.guarded_by(self)  # last, once whole: the pool asks it which agents to avoid, refuse, fill

    @property
    def registered_token(self) -> Secret[str] | None:
        """What the sidecar sends registered agents (None: registration is off)."""
        return self._registered_token

    def reset(self) -> None:
        """Count from now, as at start: after a pause (a standby term) silence says nothing yet."""
        now = self._clock()
        self._listening_since = self._last_tick = now
        for agent in self._agents.values():
            agent.last_contact = now
            agent.failed_check_started = None
            agent.last_check_ok, agent.state, agent.lost_at = True, AgentState.LIVE, None
            agent.wrong_identity = ""  # checked again at once by a term's first tick
            agent.heard = Heard()  # a standby asks no agent: what it last heard grows stale
            agent.next_sweep = min(agent.next_sweep, now + self._config.orphan_sweep_seconds)
        self._hold.reset()
        self._metrics.agents_held.set(0)  # a standby holds nothing back
        self._load, self._next_load = None, now
        self._publish()

    def _publish(self) -> None:
        shown = [self._shown(agent) for agent in self._agents.values()]
        for state in AgentState:
            self._metrics.agents.labels(state.value).set(sum(s is state for s in shown))
        answering = [a for a in self._agents.values() if a.state in (AgentState.LIVE, AgentState.SUSPECT)]
        self._metrics.agents_in_maintenance.labels("operator").set(sum(a.draining for a in answering))
        self._metrics.agents_in_maintenance.labels("agent").set(
            sum(not a.draining and a.heard.unwell is not None for a in answering)
        )
        self._metrics.agent_capacity.clear()
        self._metrics.agent_active_jobs.clear()
        if self._load is None:  # no fresh count (a standby): no gauge rather than a wrong one
            return
        capacity: dict[str, float] = {}
        active: dict[str, int] = {}
        for agent in self._agents.values():
            key = label_set(self._pool.labels(agent.id))
            active[key] = active.get(key, 0) + self._load.get(agent.id, 0)
            takes_work = agent.state in (AgentState.LIVE, AgentState.SUSPECT) and not agent.takes_no_work
            slots = (agent.heard.max_jobs or float("inf")) if takes_work else 0
            capacity[key] = capacity.get(key, 0) + slots
        for key, slots in capacity.items():
            self._metrics.agent_capacity.labels(key).set(slots)
            self._metrics.agent_active_jobs.labels(key).set(active[key])

    def _shown(self, agent: TrackedAgent) -> AgentState:
        if agent.revoked and agent.state is not AgentState.LOST:
            return AgentState.REVOKED
        if agent.state in (AgentState.LIVE, AgentState.SUSPECT) and agent.outdated:
            return AgentState.OUTDATED
        if agent.state in (AgentState.LIVE, AgentState.SUSPECT) and agent.takes_no_work:
            return AgentState.DRAINING
        return agent.state

    def state(self, agent_id: str) -> AgentState:
        agent = self._agents.get(agent_id)
        return agent.state if agent is not None else AgentState.LIVE

    def avoids(self, agent_id: str) -> bool:
        """Whether new jobs avoid the agent: lost, or another agent answers at its URL."""
        return self.state(agent_id) in (AgentState.LOST, AgentState.WRONG_IDENTITY)

    def states(self) -> dict[str, AgentState]:
        return {agent_id: agent.state for agent_id, agent in self._agents.items()}

    def capacity(self, agent_id: str) -> Capacity:
        """Its drain flag (the sidecar's own while the agent has not confirmed it) and job limit."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return Capacity()
        return Capacity(draining=agent.takes_no_work, max_jobs=agent.heard.max_jobs)

    def ids(self) -> list[str]:
        return sorted(self._agents)

    def report(self, agent_id: str) -> AgentReport:
        """``KeyError`` for an agent not configured."""
        agent = self._agents[agent_id]
        return AgentReport(
            agent_id=agent.id,
            url=self._pool.url(agent.id),
            labels=self._pool.labels(agent.id),
            state=self._shown(agent),
            last_contact_at=agent.last_contact_at,
            draining=agent.draining,
            max_jobs=agent.heard.max_jobs,
            jobs_running=agent.heard.jobs_running,
            version=agent.heard.version,
            registered=agent.registered,
            maintenance=self._maintenance(agent),
        )

    async def drain(
        self, agent_id: str, *, draining: bool, request: DrainRequest | None = None
    ) -> AgentReport:
        """Record the drain flag (it routes at once) and tell the agent, which keeps it across its
        restarts. Raises :class:`DrainNotDelivered` when the agent did not take it: the flag stays
        and is sent again once the agent answers its health checks. ``KeyError``: unknown agent."""
        agent = self._agents[agent_id]
        agent.drain_wanted = draining
        agent.drain_request = request if draining else None
        self._publish()
        verb = "drain" if draining else "undrain"
        fields = {"agent_id": agent_id, "action": f"agent_{verb}"}
        try:
            answer = await self._send_drain(agent)
        except AgentError as exc:
            log.warning("agent %s did not take the %s: %s", agent_id, verb, exc, extra=fields)
            raise DrainNotDelivered(
                f"agent {agent_id} could not be told to {verb}: {exc}; the sidecar "
                f"{'routes no new job there' if draining else 'routes jobs there again'} meanwhile, "
                "and tells the agent once it answers"
            ) from None
        bounded = request is not None and request.timeout_seconds is not None and draining
        if bounded and (answer.maintenance is None or answer.maintenance.stop_at is None):  # an older agent
            raise DrainNotDelivered(
                f"agent {agent_id} drains, but is too old to stop what still runs at the timeout: "
                "upgrade it, or stop its jobs by hand (agentic jobs stop)"
            )
        log.info("agent %s %s", agent_id, "drains" if answer.draining else "takes new jobs", extra=fields)
        return self.report(agent_id)

    def _maintenance(self, agent: TrackedAgent) -> Maintenance | None:
        """The operator's, while it drains; else the agent's own, while it is unwell."""
        if agent.draining:
            return agent.heard.maintenance
        return agent.heard.unwell.as_maintenance() if agent.heard.unwell is not None else None

    def refusal(self, agent_id: str) -> str | None:
        """Why nothing may be sent to the agent now: another agent answered at its URL (lost or not)."""
        agent = self._agents.get(agent_id)
        if agent is None or not agent.wrong_identity:
            return None
        return f"agent {agent_id}: {agent.wrong_identity}; nothing is sent there"

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick until ``stopping`` is set, on its own clock: neither a slow Airflow read nor a slow
        cycle delays noticing a lost agent."""
        self.reset()
        self._leading = True
        period = min(0.5, self._config.check_interval_seconds / 2)
        try:
            while not stopping.is_set():
                try:
                    await self.tick()
                except Exception as exc:  # the router DB is down: the next tick tries again
                    log.error("fleet bookkeeping failed: %s", type(exc).__name__, extra={"error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=period)
        finally:
            self._leading = False
            await self.close()  # a standby neither checks agents nor sweeps them
            self.reset()  # nor does it keep a past term's verdicts

    async def tick(self) -> None:
        """Start the checks and sweeps that are due, and end the jobs of lost agents (read from the
        router DB once per check interval while the agent stays lost, so jobs routed to it by id
        meanwhile end too). The checks and sweeps run in the background."""
        now = self._clock()
        # From the end of the last tick: its own awaits (a slow router DB) are no pause of the sidecar.
        if now - self._last_tick > TICK_GAP_SECONDS:
            log.warning(
                "the fleet's bookkeeping ran %.0f s late: heartbeats count from now", now - self._last_tick
            )
            self._listening_since = now
        try:
            await self._tick(now)
        finally:
            self._last_tick = self._clock()

    async def _tick(self, now: float) -> None:
        if self._registered_token is not None and now >= self._next_forget:
            self._next_forget = now + FORGET_CHECK_SECONDS
            await self._forget_silent()
        verdicts = {agent.id: self._verdict(agent) for agent in self._agents.values()}
        hold = self._hold.holds(verdicts, self._agents.values(), now)
        held = 0
        for agent in self._agents.values():
            verdict = verdicts[agent.id]
            if hold and agent.confirmed and verdict is AgentState.LOST and agent.state is not AgentState.LOST:
                verdict = AgentState.SUSPECT
                held += 1
                self._hold.held(now)
            self._update_state(agent, verdict)
            if agent.drain_wanted is not None and self._drains.due(agent, now):
                self._spawn(agent, self._resend_drain(agent))
            if agent.state is AgentState.LOST and now >= agent.next_end:
                agent.next_end = now + self._config.check_interval_seconds
                await self._lost_jobs.end(agent, silent_for=self._silent_for(agent))
            if not agent.registered and not agent.checking and now >= agent.next_check:
                self._spawn(agent, self._check(agent))
            # A revoked agent is lost once its refused heartbeats fall silent, never live again: it is
            # still swept, with its call token, so the jobs the lost rule ended stop there too.
            sweeps = agent.state is AgentState.LIVE or (agent.revoked and agent.state is AgentState.LOST)
            if sweeps and not agent.sweeping and now >= agent.next_sweep:
                self._spawn(agent, self._sweep(agent))
        if now >= self._next_load:
            self._next_load = now + self._config.check_interval_seconds
            self._load = await asyncio.to_thread(self._db.active_counts)
        self._metrics.agents_held.set(held)
        self._metrics.fence_waiting_jobs.set(
            sum(a.fence_waiting for a in self._agents.values() if a.state is AgentState.LOST)
        )
        self._publish()

    async def close(self) -> None:
        tasks = [task for agent in self._agents.values() for task in agent.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _verdict(self, agent: TrackedAgent) -> AgentState:
        if agent.registered:
            return self._heartbeat_verdict(agent)
        return agent_state(
            last_contact=agent.last_contact,
            last_check_ok=agent.last_check_ok,
            failed_check_started=agent.failed_check_started,
            lost_after=self._config.lost_after_seconds,
            wrong_identity=bool(agent.wrong_identity),
        )

    def _heartbeat_verdict(self, agent: TrackedAgent) -> AgentState:
        """A registered agent's state from its last heartbeat, whichever replica heard it: its age was
        measured on the router DB's clock, never against this replica's wall clock. Silence counts only
        from when this sidecar listened: a start, a term, a pause."""
        if agent.last_beat is None:
            return AgentState.LIVE
        now = self._clock()
        silent = max(0.0, now - agent.last_beat)
        counted = min(silent, now - self._listening_since)
        late = silent > MISSED_HEARTBEATS * agent.heartbeat_seconds
        if late and not agent.last_error:
            agent.last_error = f"its heartbeats (every {agent.heartbeat_seconds:g} s) stopped"
        return agent_state(
            last_contact=now - counted,
            last_check_ok=not late,
            failed_check_started=now if late else None,
            lost_after=self._config.lost_after_seconds,
        )

    async def follow_registered(self, stopping: asyncio.Event) -> None:
        """Every replica, leader or standby: keep the registered agents read (a standby routes jobs
        and answers for them too; a new leader starts with them known)."""
        while not stopping.is_set():
            try:
                await self.load_registered()
            except Exception as exc:  # the router DB is down: read again next time
                log.warning("reading the registered agents failed: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=REGISTERED_READ_SECONDS)

    async def load_registered(self) -> None:
        """Bring the registered agents up to date with the router DB: new ones join the pool (sent the
        fleet token), each one's heartbeat, labels and capacity are taken, forgotten ones leave. One at
        a time: an older read applied after a newer one would drop an agent just registered."""
        if self._registered_token is None:
            return
        async with self._registered_lock:
            await self._load_registered()

    async def _load_registered(self) -> None:
        token = self._registered_token
        assert token is not None  # load_registered reads nothing when registration is off
        db_now, read = await asyncio.to_thread(self._read_registered)
        rows = {row.agent_id: row for row in read}
        now = self._clock()  # after the read: a heartbeat's age is under- rather than overestimated
        if self._db_clock is not None:
            then_db, then = self._db_clock
            jumped = (db_now - then_db).total_seconds() - (now - then)
            if jumped > TICK_GAP_SECONDS:  # the heartbeats it skipped over were never silence
                log.warning("the router DB's clock jumped %.0f s forward: heartbeats count from now", jumped)
                self._listening_since = now
        self._db_clock = (db_now, now)
        for agent_id, row in rows.items():
            agent = self._agents.get(agent_id)
            if agent is not None and not agent.registered:
                continue  # configured in [[agents]]: the registry refuses it; an older row stays unused
            if agent is None:
                agent = TrackedAgent(agent_id, last_contact=now, registered=True, next_sweep=now)
                self._agents[agent_id] = agent
                log.info("agent %s joins at %s", agent_id, row.url, extra={"agent_id": agent_id})
            # Called with the token its heartbeats carry: it opens that agent alone. An agent older
            # than credentials carries none, and is called with the fleet token.
            if not row.call_token:
                agent.call_token = token
            elif agent.call_token is None or agent.call_token.current() != row.call_token:
                agent.call_token = Secret(row.call_token, what=f"agent {agent_id}'s call token")
            agent.revoked = row.revoked_at is not None
            self._pool.put(
                AgentEntry(
                    id=agent_id,
                    url=row.url,
                    labels=list(row.labels),
                    ca_file=self._config.registration_ca_file,
                ),
                agent.call_token,
            )
            age = max(0.0, (db_now - row.last_heartbeat_at).total_seconds())
            self._heard_beat(agent, row, beat=now - age)
        for agent_id in [a.id for a in self._agents.values() if a.registered and a.id not in rows]:
            self._forget(agent_id)

    def _read_registered(self) -> tuple[datetime, list[AgentRecord]]:
        """The registered agents, then the router DB's time: their heartbeats' ages on its clock."""
        rows = self._db.registered_agents()
        return self._db.now(), rows

    def _heard_beat(self, agent: TrackedAgent, row: AgentRecord, *, beat: float) -> None:
        """``beat``: the row's heartbeat on this process's monotonic clock."""
        if agent.instance and row.instance != agent.instance:
            log.info(
                "agent %s restarted (a new instance registered); sweeping it for orphans",
                agent.id,
                extra={"agent_id": agent.id, "action": "agent_restarted"},
            )
            agent.next_sweep = float("-inf")
        agent.instance = row.instance
        agent.confirmed = row.last_heartbeat_at > row.registered_at  # a heartbeat since it registered
        if agent.last_beat is not None and row.last_heartbeat_at == agent.beat_seen:
            # No heartbeat since the last read: its silence only grows, even where the router DB's clock
            # stepped back behind it (its age then reads 0 until that clock catches up).
            beat = min(beat, agent.last_beat)
        agent.beat_seen = row.last_heartbeat_at
        agent.last_beat = beat
        if agent.last_contact_at is None or row.last_heartbeat_at > agent.last_contact_at:
            agent.last_contact_at = row.last_heartbeat_at
            agent.last_error = ""
        agent.heartbeat_seconds = max(0.1, row.heartbeat_seconds)
        if row.fence_after_seconds is not None:  # None: not said (an agent of the release before)
            agent.fence = FenceTerms(
                row.fence_after_seconds, row.fence_grace_seconds or 0.0, row.at_most_once_default
            )
        self._learn(
            agent,
            Heard(
                draining=row.draining,
                max_jobs=row.max_jobs,
                jobs_running=row.jobs_running,
                version=row.version[:MAX_VERSION_CHARS],
                maintenance=maintenance_of(row.maintenance),
                unwell=unwell_of(row.unwell),
            ),
        )

    async def _forget_silent(self) -> None:
        """Registered agents silent for ``forget_after_seconds`` and without active jobs leave the
        router DB (an autoscaling group's VMs come and go): the next read drops them here too."""
        # Heartbeats are the router DB's times: so is the moment they are compared with.
        before = await asyncio.to_thread(self._db.now) - timedelta(seconds=self._config.forget_after_seconds)
        for agent_id in await asyncio.to_thread(self._db.forget_agents, silent_before=before):
            log.info(
                "agent %s forgotten: silent since before %s, no active job",
                agent_id,
                before.isoformat(timespec="seconds"),
                extra={"agent_id": agent_id, "action": "agent_forgotten"},
            )
            self._forget(agent_id)

    def _forget(self, agent_id: str) -> None:
        agent = self._agents.pop(agent_id, None)
        if agent is not None:
            for task in agent.tasks:
                task.cancel()
        self._pool.remove(agent_id)

    def _update_state(self, agent: TrackedAgent, state: AgentState) -> None:
        if state is agent.state:
            return
        fields = {"agent_id": agent.id, "action": f"agent_{state.value}"}
        if state is AgentState.LOST:
            # Stamped with the router DB's time as its jobs are read, in this very tick.
            agent.lost_at, agent.next_end, agent.fence_waiting = None, float("-inf"), 0
            reason = lost_reason(agent, self._config, self._started_at)
            log.error("%s; its jobs end FAILED", reason, extra=fields)
        elif state is AgentState.WRONG_IDENTITY:
            log.error(
                "agent %s: %s; nothing is sent there, and its jobs end FAILED if %s does not answer "
                "there within lost_after_seconds=%s",
                agent.id,
                agent.wrong_identity,
                agent.id,
                f"{self._config.lost_after_seconds:g}",
                extra={**fields, "url": self._pool.url(agent.id)},
            )
        elif agent.state is AgentState.LOST:
            log.warning("agent %s answers again; sweeping it for orphans", agent.id, extra=fields)
            # Due in this very tick: its jobs were ended while it kept running them.
            agent.next_sweep = float("-inf")
        elif agent.state is AgentState.WRONG_IDENTITY and state is AgentState.LIVE:
            log.warning("agent %s answers as itself again", agent.id, extra=fields)
        agent.state = state

    def _spawn(self, agent: TrackedAgent, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        agent.tasks.add(task)
        task.add_done_callback(agent.tasks.discard)

    async def _check(self, agent: TrackedAgent) -> None:
        agent.checking = True
        started = self._clock()
        try:
            answer = await asyncio.wait_for(
                self._pool.prober(agent.id).health(), self._config.check_timeout_seconds
            )
        except (AgentError, TimeoutError) as exc:
            agent.last_check_ok = False
            agent.failed_check_started = started
            agent.last_error = (
                str(exc)
                if not isinstance(exc, TimeoutError)
                else (f"no answer to /health within {self._config.check_timeout_seconds:g} s")
            )
        else:
            problem = identity_problem(answer, expected=agent.id, url=self._pool.url(agent.id))
            if problem is not None:
                # Another agent's answer is no contact with this one: counted as a failed check.
                agent.wrong_identity = agent.last_error = problem
                agent.last_check_ok = False
                agent.failed_check_started = started
            else:
                agent.last_contact = self._clock()
                agent.last_contact_at = datetime.now(UTC)
                agent.last_check_ok = True
                agent.failed_check_started = None
                agent.last_error = agent.wrong_identity = ""
                self._learn(agent, heard(answer))
                self._learn_fence(agent, answer.get("fence"))
        finally:
            agent.checking = False
            agent.next_check = started + self._config.check_interval_seconds

    def _learn_fence(self, agent: TrackedAgent, said: object) -> None:
        """An ``[[agents]]`` agent's fence terms from its health answer (absent: the terms last heard
        stand). Terms that outlast ``lost_after_seconds`` are logged; the jobs it would fence avoid it."""
        try:
            terms = FenceTerms.from_json(said)
        except ProtocolError:
            return  # unreadable: the terms last heard stand
        if terms is None:
            return
        agent.fence = terms
        problem = self.fence_refusal(agent.id, at_most_once=True) if terms.fences else None
        if problem is not None and problem != agent.fence_said:
            log.warning(
                "%s; it takes no %s meanwhile",
                problem.replace("one heartbeat", "one health check and its timeout"),
                "job (it makes every job at_most_once)" if terms.default else "at_most_once job",
                extra={"agent_id": agent.id, "action": "agent_fence_too_late"},
            )
        agent.fence_said = problem or ""

    def fence_terms(self, agent_id: str) -> FenceTerms | None:
        """The agent's fence terms as last said (None: not said, or no such agent)."""
        agent = self._agents.get(agent_id)
        return agent.fence if agent is not None else None

    def fence_refusal(self, agent_id: str, *, at_most_once: bool) -> str | None:
        """Why a job (``at_most_once``: it asked to be fenced) must not go to the agent (None: it may):
        it would be fenced by a fence that could still run once the agent is declared lost, or it asked
        for a fence the agent does not have. Terms not said yet: the agent refuses itself if it must."""
        agent = self._agents.get(agent_id)
        if agent is None or agent.fence is None:
            return None
        if at_most_once and not agent.fence.fences:
            return f"agent {agent_id} does not fence ([agent] fence_after_seconds 0)"
        if not agent.fence.fenced(at_most_once):
            return None
        return fence_problem(
            agent.fence,
            agent_id=agent_id,
            heartbeat_seconds=fence_margin(agent, self._config),
            lost_after=self._config.lost_after_seconds,
        )

    def _silent_for(self, agent: TrackedAgent) -> float:
        """How long the agent has been silent, as the lost rule counts it (only since this sidecar
        listened: a replica that just took over counts less, never more)."""
        now = self._clock()
        if agent.registered:
            heard_at = agent.last_beat if agent.last_beat is not None else self._listening_since
            return min(now - heard_at, now - self._listening_since)
        return now - agent.last_contact

    def _learn(self, agent: TrackedAgent, news: Heard) -> None:
        agent.heard = news
        outdated = too_old(news.version, self._min_version)
        if outdated != agent.outdated:
            agent.outdated = outdated
            fields = {"agent_id": agent.id, "action": "agent_outdated" if outdated else "agent_up_to_date"}
            if outdated:
                log.error(
                    "agent %s says version %s, older than %s, the lowest this sidecar works with: it gets no "
                    "new job until upgraded ([fleet] min_agent_version)",
                    agent.id,
                    news.version,
                    self._min_version,
                    extra=fields,
                )
            else:
                log.warning(
                    "agent %s now says version %s: it takes jobs again", agent.id, news.version, extra=fields
                )
        if agent.drain_wanted is not None and news.draining is agent.drain_wanted:
            agent.drain_wanted = None  # the agent holds the flag now, and keeps it across restarts

    async def _resend_drain(self, agent: TrackedAgent) -> None:
        try:
            await self._send_drain(agent)
        except AgentError as exc:
            fields = {"agent_id": agent.id}
            log.warning("agent %s did not take the drain flag again: %s", agent.id, exc, extra=fields)

    async def _send_drain(self, agent: TrackedAgent) -> Heard:
        """Send the flag wanted now; what the agent answered."""
        news = await self._drains.send(agent)
        if agent.registered or self._leading:
            # The wanted flag stays until a later heartbeat or health answer carries it: one sent before
            # this answer and read after it would otherwise route to a draining agent again.
            agent.heard = news
        else:
            self._learn(agent, news)  # a standby hears nothing else of a configured agent
        self._publish()
        return news

    async def _sweep(self, agent: TrackedAgent) -> None:
        agent.sweeping = True
        try:
            await self._orphans.sweep(agent.id)
        except Exception as exc:  # an unanswered sweep is retried at the next period
            log.warning("orphan sweep of agent %s failed: %s", agent.id, exc, extra={"agent_id": agent.id})
        finally:
            agent.sweeping = False
            agent.next_sweep = self._clock() + self._config.orphan_sweep_seconds

    async def sweep(self, agent_id: str) -> int:
        """Stop the agent's jobs that the router DB has ended; returns how many."""
        return await self._orphans.sweep(agent_id)
