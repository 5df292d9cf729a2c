"""Agents that register themselves: ``PUT /agents/{agent_id}`` on any sidecar replica.

A registration and a heartbeat are the same request (:mod:`agent_api.registration`), authenticated
by the fleet token, and written to the router DB's ``agents`` table, where the leader's
:class:`~reconciler.fleet.liveness.Fleet` reads them: liveness from the heartbeats, routing from the
labels and capacity, exactly as for an agent configured in ``[[agents]]``.

Before the first heartbeat of an agent process (a new ``instance``, or a new URL) is accepted, this
replica calls the agent back at the URL it gave: its ``/healthz`` must name the same id, and a request
carrying the fleet token must be accepted. So an agent is only registered where the sidecar can reach
it, and a typo in ``SELF_URL`` is refused at once, not found when its first stop fails. An id held by
another live agent (another URL, another instance, a heartbeat within ``lost_after_seconds``) is
refused: one agent cannot take over another's jobs while that one runs; a restarted agent (another
instance of the same home at the same URL) re-registers and keeps its jobs. Another identity at that
URL (a VM rebuilt with an empty disk, an impostor with the fleet token, one proving none) is no restart:
it takes the id only as a claim from anywhere else does, once the registration is silent for
``lost_after_seconds`` and holds no active job.

A restarted agent may also come back at another URL (a new port, http to https, a host name that now
resolves otherwise): it keeps its jobs if it proves it is the same agent, on the same home. The fleet
token cannot prove that (every VM holds it), so a heartbeat carries what only the agent's home has
(:mod:`agent.identity`): a proof derived from the secret kept there, whose fingerprint the router DB
holds, and the instances that home ran before, of which the registration's must be one. The call-back
then checks that the agent at the new URL shows this very instance and fingerprint (so a heartbeat
naming someone else's URL is refused), and the old URL is asked too: the move waits while another
process answers there as the agent (two processes of one home, or a copy of it), and while the old URL
gives no clear answer (a timeout, a reset, a 5xx): a paused or overloaded agent is alive, and a copy
of its home must not take its place. Only a refused connection, a host name that no longer exists or
another agent answering there shows the old process gone. A move that waits is judged as a claim from
elsewhere: it takes a registration only once that is lost and its jobs have ended.
:func:`judge_claim` and the ``*_problem`` functions decide; the router DB's upsert applies the move
only to the very row judged. A home wiped or rebuilt is a new agent: it registers once its
predecessor is lost and its jobs have ended. A heartbeat without a proof (an agent older than
identities) is judged as such an agent.

The fleet token is a bootstrap token, as a kubelet's is: a heartbeat carrying it may register a new
id, or take one whose holder is lost. The identity proof is the agent's credential (it arrives in
``X-Agent-Credential``; the router DB keeps its fingerprint). A heartbeat carrying the credential alone
is an update of the row that holds it (:meth:`RouterDB.beat_agent_with_credential`): that agent beats,
restarts or moves with it, and nobody holding only the fleet token speaks for it. The credential
expires ``[fleet] credential_lifetime_seconds`` after it was issued; the answer asks for a renewal
once half of that has passed (``renew_credential``), and the next heartbeat brings the new one.
``agentic agents revoke`` ends it: every heartbeat for that id is then refused (403) until an
operator forgets the agent. The sidecar calls a registered agent with the ``call_token`` its
heartbeats carry (checked by the call-back), never with the fleet token (an agent older than
credentials aside, which sends none).

A heartbeat's ``jobs`` (what changed on the agent since its last accepted heartbeat) are recorded as
the loop's catch-up read records them (:meth:`JobService.apply_agent_reports`): an exit reaches the
router DB, and a trigger waiting on the job, without the sidecar asking. Only once they are recorded
is the heartbeat answered 200; otherwise the agent sends them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from agent_api.protocol import JobInfo
from agent_api.registration import Heartbeat, identity_fingerprint
from reconciler.config import FleetConfig
from reconciler.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Refused,
    TooMany,
    Unauthenticated,
    Unavailable,
)
from reconciler.fleet.call_back import CallBack, CallBackFailed, OutOfScope
from reconciler.fleet.claims import (
    Claim,
    Judged,
    judge_claim,
    moved_in_place,
    still_there_problem,
)
from reconciler.fleet.fencing import fence_problem
from reconciler.metrics import Metrics
from router_db import AgentConflict, AgentRecord, NotRegistered, RouterDB
from router_db.records import AGENT_MAINTENANCE_CHARS
from servicekit.credentials import Secret
from servicekit.ratelimit import RateLimiter

log = logging.getLogger("reconciler.fleet.registry")

RENEW_AFTER = 0.5  # of credential_lifetime_seconds: from then on, each answer asks for a renewal


class Revoked(Forbidden):
    """The agent id's credential was revoked: no heartbeat for it is taken until it is forgotten."""

    def __init__(self, held: AgentRecord) -> None:
        when = held.revoked_at.isoformat(timespec="seconds") if held.revoked_at else "?"
        super().__init__(
            f"agent {held.agent_id}'s credential was revoked at {when}: the id registers again only once "
            f"an operator forgets it (agentic agents forget {held.agent_id})",
        )


@dataclass(frozen=True)
class Accepted:
    """A heartbeat as stored, and what its answer says of the agent's credential."""

    record: AgentRecord
    renew_credential: bool = False  # send a new one with the next heartbeat
    credential_renewed: bool = False  # the new one sent is the one held now


def _said(value: dict[str, Any] | None) -> str:
    """What an agent says of its maintenance, as the router DB keeps it: JSON, or "" for nothing (and
    for anything past the column's bound, which only a newer agent could send: shown as nothing)."""
    if value is None:
        return ""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= AGENT_MAINTENANCE_CHARS else ""


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
        bootstraps: bool = True,  # a fleet token is set: new agents may register
    ) -> None:
        self._db = db
        self._bootstraps = bootstraps
        self._record_jobs = record_jobs
        self._token = token  # what the sidecar sends to registered agents
        self._static = frozenset(static_ids)
        self._config = config
        self._metrics = metrics
        # agent id -> (instance, url, identity fingerprint) called back here
        self._verified: dict[str, tuple[str, str, str]] = {}
        self._scope = config.scope()
        self._call_back = CallBack(config, self._scope, token)
        rate = config.registration_rate_per_second
        self._limiter = RateLimiter(rate=rate, burst=max(1, round(5 * rate))) if rate > 0 else None

    @property
    def lost_after_seconds(self) -> float:
        return self._config.lost_after_seconds

    async def heartbeat(
        self, agent_id: str, beat: Heartbeat, *, credential: str = "", bootstrap: bool = True
    ) -> Accepted:
        """Record the agent's registration or heartbeat; :class:`Refused` says why not.

        ``credential``: the identity proof presented in the header ("": the body's, from an agent older
        than credentials); ``bootstrap``: the request carried the fleet token, which may register the
        id (otherwise the credential alone speaks, for the row that holds it)."""
        try:
            if credential and beat.identity_proof and credential != beat.identity_proof:
                raise Invalid("identity_proof differs from the credential header: send one of them")
            proof = credential or beat.identity_proof
            if beat.next_identity_proof:
                # A renewal speaks with the credential it renews, never as a bootstrap: one the
                # sidecar took already (its answer lost, the agent restarted) is taken again as held.
                # The fleet token lets an expired credential renew instead of being issued again.
                accepted = await self._accept_credential(agent_id, beat, proof, fresh=not bootstrap)
            elif bootstrap:
                # Each start of an agent registers with the fleet token: its fence is judged then. Terms
                # that could outlast lost_after_seconds register all the same (refusing would leave its
                # old terms behind, and turn a config edit into an outage): only the jobs it would
                # fence avoid it (Fleet.fence_refusal), saying why.
                if beat.fence is not None and (
                    late := fence_problem(
                        beat.fence,
                        agent_id=agent_id,
                        heartbeat_seconds=beat.heartbeat_seconds,
                        lost_after=self._config.lost_after_seconds,
                    )
                ):
                    log.warning(
                        "%s; it takes no %s meanwhile",
                        late,
                        "job (it makes every job at_most_once)" if beat.fence.default else "at_most_once job",
                        extra={"agent_id": agent_id, "action": "agent_fence_too_late"},
                    )
                stored = await self._accept(agent_id, beat, proof)
                accepted = Accepted(stored, renew_credential=self._due(stored))
            else:
                accepted = await self._accept_credential(agent_id, beat, proof)
        except Refused as exc:
            result = "refused"
            if isinstance(exc, OutOfScope):
                result = "out_of_scope"
            elif isinstance(exc, Revoked):
                result = "revoked"
            self._metrics.heartbeats.labels(result).inc()
            log.warning(
                "registration of agent %s refused: %s",
                agent_id,
                exc.detail if isinstance(exc, CallBackFailed) else exc,
                extra={"agent_id": agent_id, "action": "agent_refused", "url": beat.url},
            )
            raise
        self._metrics.heartbeats.labels("accepted").inc()
        return accepted

    def _check_claim(self, agent_id: str, beat: Heartbeat) -> None:
        if agent_id in self._static:
            raise Conflict(f"agent {agent_id} is configured in [[agents]]: it cannot also register")
        if (outside := self._scope.claim_problem(agent_id, beat.labels, beat.url)) is not None:
            raise OutOfScope(outside)

    async def _accept_credential(
        self, agent_id: str, beat: Heartbeat, proof: str, *, fresh: bool = True
    ) -> Accepted:
        """A heartbeat made with the agent's credential alone: the row holding it beats, restarts or
        moves, and may renew it; anything else is refused, nothing changed. ``fresh``: the credential
        must be within its lifetime (a renewal under the fleet token need not be)."""
        self._check_claim(agent_id, beat)
        if not proof:
            raise Unauthenticated("no credential: present the fleet token, or the agent's credential")
        fingerprint = identity_fingerprint(proof)
        renewal = identity_fingerprint(beat.next_identity_proof)
        key = (beat.instance, beat.url, fingerprint)
        first = self._verified.get(agent_id) != key
        held, judged, moving_from = None, Judged(Claim.BEAT), None
        if first:
            held = await asyncio.to_thread(self._db.registered_agent, agent_id)
            self._refuse_credential(agent_id, held, fingerprint, renewal)
            assert held is not None
            await self._call_back.check_address(beat.url)
            held, judged = await self._verify(agent_id, beat, fingerprint, held, held.identity_fingerprint)
            if judged.claim is Claim.TAKEOVER:  # the credential's own agent, but no restart nor move
                # 401: the agent registers with the fleet token, where the takeover rule applies (it
                # takes the id once its holder is lost and its jobs have ended).
                raise Unauthenticated(
                    f"agent id {agent_id} is held by its process at {held.url if held else '?'}: "
                    f"{judged.unproven}; register with the fleet token: this process takes it only once "
                    "that one is lost",
                )
        if renewal and (held := held or await asyncio.to_thread(self._db.registered_agent, agent_id)):
            if held.identity_fingerprint == fingerprint:  # a new renewal, not one held already
                await self._call_back.confirm_renewal(agent_id, beat.url, renewal)
            if judged.claim is Claim.MOVE:
                assert held is not None
                moving_from = (held.url, held.instance)
        lifetime = self._config.credential_lifetime_seconds if fresh else 0.0
        record = self._record(agent_id, beat, renewal or fingerprint)
        try:
            stored = await asyncio.to_thread(
                self._db.beat_agent_with_credential,
                record,
                proven=fingerprint,
                lifetime=lifetime,
                moving_from=moving_from,
            )
        except NotRegistered as exc:
            self._verified.pop(agent_id, None)
            self._refuse_credential(agent_id, exc.held, fingerprint, renewal)
            issued = exc.held.credential_issued_at if exc.held is not None else None
            if exc.held is not None and issued and fresh and await asyncio.to_thread(self._expired, exc.held):
                raise Unauthenticated(
                    f"agent {agent_id}'s credential expired (issued {issued.isoformat(timespec='seconds')}, "
                    f"[fleet] credential_lifetime_seconds={lifetime:g}): register with the fleet token, "
                    "then renew it",
                ) from None
            assert exc.held is not None
            raise Conflict(
                f"agent id {agent_id} is held by its process at {exc.held.url} (instance "
                f"{exc.held.instance}): this one is neither it, nor its restart there, nor a proven move",
            ) from None
        await self._after_beat(agent_id, beat, stored)
        if first and not beat.leaving:
            self._verified[agent_id] = key
            self._log_registered(agent_id, beat, held, judged)
        renewed = bool(renewal) and stored.identity_fingerprint == renewal
        if renewed:
            self._verified.pop(agent_id, None)  # the next heartbeat shows the new one: called back
            log.info("agent %s renewed its credential", agent_id, extra={"agent_id": agent_id})
        return Accepted(
            stored, renew_credential=self._due(stored) and not renewal, credential_renewed=renewed
        )

    def _expired(self, held: AgentRecord) -> bool:
        """Whether ``held``'s credential is past its lifetime by the router DB's clock (blocking)."""
        lifetime = self._config.credential_lifetime_seconds
        issued = held.credential_issued_at
        if lifetime <= 0 or issued is None:
            return False
        return (self._db.now() - issued).total_seconds() > lifetime

    def _due(self, stored: AgentRecord) -> bool:
        """Whether the stored credential is past half its lifetime (by the router DB's clock: the
        heartbeat's time was written by it)."""
        lifetime = self._config.credential_lifetime_seconds
        issued = stored.credential_issued_at
        if lifetime <= 0 or issued is None or not stored.call_token:
            return False  # no expiry, or an agent older than credentials (it could not renew)
        return (stored.last_heartbeat_at - issued).total_seconds() >= RENEW_AFTER * lifetime

    def _refuse_credential(
        self,
        agent_id: str,
        held: AgentRecord | None,
        fingerprint: str,
        renewal: str,
    ) -> None:
        """Refused unless ``held`` holds this credential (or has taken its renewal already)."""
        if held is None and not self._bootstraps:
            raise NotFound(
                f"agent {agent_id} is not registered, and registration of new agents is off on this "
                "sidecar (no fleet token): agents registered already speak with their own credentials",
            )
        if held is None:
            raise Unauthenticated(
                f"agent {agent_id} is not registered (or was forgotten): register with the fleet token",
            )
        if held.revoked_at is not None:
            raise Revoked(held)
        holds = bool(held.identity_fingerprint) and (
            held.identity_fingerprint == fingerprint
            or (
                bool(renewal)
                and held.identity_fingerprint == renewal
                and held.previous_fingerprint == fingerprint
            )
        )
        if not holds:
            raise Unauthenticated(
                f"this credential is not agent {agent_id}'s: register with the fleet token (another "
                "identity takes the id only once its holder is lost and its jobs have ended)",
            )

    def _record(self, agent_id: str, beat: Heartbeat, fingerprint: str) -> AgentRecord:
        # The times are the router DB's, set as the row is written: the replica that judges this
        # heartbeat compares it with that clock, never with this replica's (see router_db.clock).
        placeholder = datetime.now(UTC)
        return AgentRecord(
            agent_id=agent_id,
            url=beat.url,
            labels=beat.labels,
            max_jobs=beat.max_jobs,
            jobs_running=beat.jobs_running,
            version=beat.version,
            draining=beat.draining,
            instance=beat.instance,
            registered_at=placeholder,
            last_heartbeat_at=placeholder,
            heartbeat_seconds=beat.heartbeat_seconds,
            identity_fingerprint=fingerprint,
            call_token=beat.next_call_token if beat.next_identity_proof else beat.call_token,
            fence_after_seconds=beat.fence.after_seconds if beat.fence is not None else None,
            fence_grace_seconds=beat.fence.grace_seconds if beat.fence is not None else None,
            at_most_once_default=beat.fence is not None and beat.fence.default,
            maintenance=_said(beat.maintenance.to_json() if beat.maintenance is not None else None),
            unwell=_said(beat.unwell.to_json() if beat.unwell is not None else None),
        )

    async def _accept(self, agent_id: str, beat: Heartbeat, proof: str) -> AgentRecord:
        self._check_claim(agent_id, beat)
        fingerprint = identity_fingerprint(proof)
        key = (beat.instance, beat.url, fingerprint)
        first = self._verified.get(agent_id) != key
        held, judged, moving_from = None, Judged(Claim.BEAT), None
        if first:
            # Its address is held to [fleet] allowed_networks before it is called back.
            await self._call_back.check_address(beat.url)
            held = await asyncio.to_thread(self._db.registered_agent, agent_id)
            if held is not None and held.revoked_at is not None:
                raise Revoked(held)
            held, judged = await self._verify(agent_id, beat, fingerprint, held, fingerprint)
            if judged.claim is Claim.MOVE:
                assert held is not None
                moving_from = (held.url, held.instance)
        record = replace(self._record(agent_id, beat, fingerprint), call_token=beat.call_token)
        try:
            stored = await asyncio.to_thread(
                self._db.heartbeat_agent_now,
                record,
                alive_within=self._config.lost_after_seconds,
                moving_from=moving_from,
            )
        except AgentConflict as exc:
            self._verified.pop(agent_id, None)  # judged again next time, against the row as it is then
            holder = exc.existing
            if holder.revoked_at is not None:
                raise Revoked(holder) from None
            unproven = f"; it is no move to a new URL: {judged.unproven}" if judged.unproven else ""
            raise Conflict(
                f"agent id {agent_id} is held by a live agent at {holder.url} (last heartbeat "
                f"{holder.last_heartbeat_at.isoformat(timespec='seconds')}); it can be taken once that one "
                f"is silent for lost_after_seconds={self._config.lost_after_seconds:g}{unproven}",
            ) from None
        await self._after_beat(agent_id, beat, stored)
        if beat.leaving:
            return stored
        if first:
            self._verified[agent_id] = key
            self._log_registered(agent_id, beat, held, judged)
        return stored

    async def _after_beat(self, agent_id: str, beat: Heartbeat, stored: AgentRecord) -> None:
        """A stored heartbeat's jobs recorded, and a leaving agent's row let go."""
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
                raise Unavailable(f"the jobs' changes could not be recorded ({type(exc).__name__})") from None
        if beat.leaving:
            self._verified.pop(agent_id, None)
            gone = await asyncio.to_thread(self._db.leave_agent, agent_id, beat.instance)
            log.info(
                "agent %s leaves%s",
                agent_id,
                "" if gone else ", still holding active jobs: kept until they end or it is lost",
                extra={"agent_id": agent_id, "action": "agent_left"},
            )

    def _log_registered(
        self, agent_id: str, beat: Heartbeat, held: AgentRecord | None, judged: Judged
    ) -> None:
        fields = {"agent_id": agent_id, "url": beat.url}
        if held is not None and judged.claim is Claim.MOVE and held.url != beat.url:
            how = "its home's identity proven"
            log.warning(
                "agent %s moved from %s to %s (%s; instance %s follows %s): its jobs are addressed there now",
                agent_id,
                held.url,
                beat.url,
                how,
                beat.instance,
                held.instance,
                extra={**fields, "action": "agent_moved", "from_url": held.url},
            )
            return
        if held is not None and judged.claim is Claim.TAKEOVER:
            log.warning(
                "agent %s registered at %s, taking the id over from the agent at %s, silent and without "
                "active jobs (%s)",
                agent_id,
                beat.url,
                held.url,
                judged.unproven,
                extra={**fields, "action": "agent_registered", "from_url": held.url},
            )
            return
        log.info(
            "agent %s registered at %s", agent_id, beat.url, extra={**fields, "action": "agent_registered"}
        )

    async def _verify(
        self, agent_id: str, beat: Heartbeat, fingerprint: str, held: AgentRecord | None, identity: str
    ) -> tuple[AgentRecord | None, Judged]:
        """Before a process's first heartbeat here: what it claims against ``held`` (the id's row), or
        :class:`Refused`. ``fingerprint``: the credential's, which the agent shows; ``identity``: the one
        it is judged as (its row's, when the credential proved it, a renewal under way included)."""
        known = held is not None and (
            (held.instance, held.url) == (beat.instance, beat.url)
            or (bool(fingerprint) and fingerprint == held.identity_fingerprint)
        )
        if not known and self._limiter is not None and (wait := self._limiter.acquire("registrations")):
            # A new process or address is called back, which costs requests: rate-limited. A process
            # the router DB holds already (this replica restarted, or another heard it), or one proving
            # the registration's identity (the agent restarted or moved) is not: none of those may
            # wait past lost_after_seconds, whoever else spends the limit.
            raise TooMany(
                "too many agent registrations at once ([fleet] registration_rate_per_second): retry",
                retry_after=wait,
            )
        if held is None and self._scope.max_agents:
            count = await asyncio.to_thread(self._counted_agents)
            if (full := self._scope.full(count, new=True)) is not None:
                raise OutOfScope(full)
        judged = judge_claim(
            held,
            url=beat.url,
            instance=beat.instance,
            fingerprint=identity,
            previous_instances=beat.previous_instances,
        )
        if judged.refusal:
            raise Conflict(judged.refusal)
        if judged.claim is Claim.TAKEOVER and held is not None:
            # Refused before any call-back while its holder lives: a claim on a live agent's id costs
            # the sidecar no request. At the row's own URL the router DB's upsert would even take it
            # as a restart, so the rule is checked here.
            await self._refuse_unless_free(held, judged)
        within = self._config.lost_after_seconds
        sharing = await asyncio.to_thread(
            self._db.live_agent_at, beat.url, other_than=agent_id, alive_within=within
        )
        if sharing is not None:  # stops for one would reach the other
            raise Conflict(
                f"{beat.url} is registered by agent {sharing.agent_id}, which heartbeat within "
                f"lost_after_seconds={within:g}: two agents cannot share one address",
            )
        if judged.claim is not Claim.MOVE:
            await self._call_back.verify(agent_id, beat, fingerprint)
            return held, judged
        assert held is not None
        if moved_in_place(held.url, beat.url):  # the old URL is the mover's own socket
            await self._call_back.verify(agent_id, beat, fingerprint)
            return held, judged
        # The old URL is asked while the new one is called back: a move costs no more time than a
        # registration, within the agent's heartbeat timeout.
        looking = asyncio.create_task(self._call_back.answer_at(held.url))
        try:
            await self._call_back.verify(agent_id, beat, fingerprint)
        except BaseException:
            looking.cancel()
            await asyncio.gather(looking, return_exceptions=True)
            raise
        old = await looking
        problem = still_there_problem(old, agent_id=agent_id, old_url=held.url, instance=beat.instance)
        if problem is not None:
            # No move now: the claim is left the rule any claim from elsewhere has (the router DB's),
            # which takes only a registration long silent without active jobs. So a process hung at
            # the old URL for good keeps the agent out only until it is lost and its jobs have ended.
            return held, Judged(Claim.TAKEOVER, unproven=problem)
        return held, judged

    async def _refuse_unless_free(self, held: AgentRecord, judged: Judged) -> None:
        """The takeover rule, for a claim at the registration's own URL by another identity: the
        router DB's upsert would take any new instance there as the agent's restart, so the rule is
        checked here, by the router DB's clock: silent for ``lost_after_seconds``, no active job.
        It is read before the write, not in it (the upsert's restart clause is the router DB's): a
        row that silent is lost, so no job is routed to it meanwhile, and only its own process's
        heartbeat, racing this claim, would make it live again."""
        within = self._config.lost_after_seconds
        now = await asyncio.to_thread(self._db.now)
        silent = held.last_heartbeat_at < now - timedelta(seconds=within)
        active = len(await asyncio.to_thread(self._db.active, agent_id=held.agent_id)) if silent else 0
        if silent and not active:
            return
        holding = f"{active} active job(s)" if silent else f"a heartbeat within lost_after_seconds={within:g}"
        raise Conflict(
            f"agent id {held.agent_id} is held by the agent registered at {held.url} ({holding}); it can be "
            f"taken once that one is silent for lost_after_seconds={within:g} and its jobs have ended. "
            f"This is no restart or move of that agent: {judged.unproven}",
        )

    async def revoke(self, agent_id: str) -> AgentRecord:
        """End a registered agent's credential (``agentic agents revoke``): its next heartbeat, and
        every registration of its id, is refused until it is forgotten; the row as stored."""
        if agent_id in self._static:
            raise Conflict(
                f"agent {agent_id} is configured in [[agents]]: remove it there, and rotate its token"
            )
        record = await asyncio.to_thread(self._db.revoke_agent, agent_id)
        if record is None:
            raise NotFound(f"no registered agent {agent_id}")
        self._verified.pop(agent_id, None)
        log.warning(
            "agent %s's credential revoked: its heartbeats are refused, no new job goes to it, and its "
            "jobs end FAILED once it is lost (rotate the fleet token too if its VM is compromised)",
            agent_id,
            extra={"agent_id": agent_id, "action": "agent_revoked", "url": record.url},
        )
        return record

    async def forget(self, agent_id: str) -> None:
        """Remove a revoked or lost agent without active jobs (``agentic agents forget``): its id may
        register again, with the fleet token."""
        within = self._config.lost_after_seconds
        if await asyncio.to_thread(self._db.forget_agent, agent_id, alive_within=within):
            self._verified.pop(agent_id, None)
            log.warning(
                "agent %s forgotten by an operator: its id may register again",
                agent_id,
                extra={"agent_id": agent_id, "action": "agent_forgotten"},
            )
            return
        if await asyncio.to_thread(self._db.registered_agent, agent_id) is None:
            raise NotFound(f"no registered agent {agent_id}")
        raise Conflict(
            f"agent {agent_id} is kept: an agent is forgotten once it holds no active job and is revoked, "
            f"or silent for lost_after_seconds={within:g} (its jobs end FAILED once it is lost)",
        )

    def _counted_agents(self) -> int:
        """Registered agents that take a place under max_agents: heard within lost_after_seconds (by
        the router DB's clock), or holding active jobs. A lost one without jobs frees its place, though
        its row stays until forget_after_seconds. Read before the call-back: registrations arriving
        together may pass the cap by their number."""
        rows = self._db.registered_agents()
        busy = self._db.active_counts()
        alive_after = self._db.now() - timedelta(seconds=self._config.lost_after_seconds)
        return sum(row.last_heartbeat_at >= alive_after or busy.get(row.agent_id, 0) > 0 for row in rows)

    async def close(self) -> None:
        await self._call_back.close()
