"""An agent as the fleet tracks it, and the pure rules over it: its state from its answers
(:func:`agent_state`), what an answer says of its work (:func:`heard`), whether most agents failing at
once hold losses back (:func:`partitioned`), how a lost agent's job ends, and when a fenced one may.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from agent_api.fencing import UNSAID, FenceTerms
from agent_api.maintenance import DrainRequest, Maintenance, Unwell
from agent_api.protocol import ProtocolError
from reconciler.config import FleetConfig
from reconciler.errors import AgentUnreachable
from router_db import JobRecord, JobStatus, Transition
from servicekit.credentials import Secret

MISSED_HEARTBEATS = 3  # this many heartbeats late: suspect (lost takes lost_after_seconds)
# A tick this late says the sidecar itself was paused or starved: heartbeats were not heard meanwhile,
# so silence is counted again from then, as at a start.
TICK_GAP_SECONDS = 2.0
MAX_VERSION_CHARS = 100


class AgentState(StrEnum):
    """Also the ``state`` label of ``reconciler_agents``."""

    LIVE = "live"  # its last health check answered
    SUSPECT = "suspect"  # its last health check failed; not lost yet
    LOST = "lost"  # silent for lost_after_seconds; its jobs were ended
    WRONG_IDENTITY = "wrong_identity"  # another agent answered at its URL; not lost yet
    # Reported only (GET /agents, the metric): a live or suspect agent taking no new work. Liveness
    # itself stays live or suspect meanwhile: draining changes nothing of how it is checked.
    DRAINING = "draining"
    # Reported only: a registered agent whose credential was revoked; no new work, and its heartbeats
    # are refused, so it goes lost by the plain rule.
    REVOKED = "revoked"
    # Reported only: a live or suspect agent saying a version older than this sidecar works with
    # (reconciler/fleet/versions.py); no new work until it says a newer one.
    OUTDATED = "outdated"


def agent_state(
    *,
    last_contact: float,
    last_check_ok: bool,
    failed_check_started: float | None,
    lost_after: float,
    wrong_identity: bool = False,
) -> AgentState:
    """The agent's state from the times of its last answer and of its latest failed check (monotonic);
    ``wrong_identity``: the last agent to answer at its URL was another one."""
    if failed_check_started is not None and failed_check_started - last_contact >= lost_after:
        return AgentState.LOST
    if wrong_identity:
        return AgentState.WRONG_IDENTITY
    return AgentState.LIVE if last_check_ok else AgentState.SUSPECT


def identity_problem(answer: dict[str, Any], *, expected: str, url: str) -> str | None:
    """Why a health answer is not from the agent ``expected`` (None when it is)."""
    reported = answer.get("agent_id")
    if reported == expected:
        return None
    said = f"says it is {reported!r}" if isinstance(reported, str) else "gives no agent_id"
    return f"the agent at {url} {said[:200]}, not {expected!r}"


@dataclass(frozen=True)
class Heard:
    """What a health answer says of the agent's work; ``None``: it did not say (an older agent)."""

    draining: bool | None = None
    max_jobs: int | None = None  # 0: no limit
    jobs_running: int | None = None
    version: str | None = None
    maintenance: Maintenance | None = None  # while draining: by whom, since when, why
    unwell: Unwell | None = None  # why it takes no new job by itself (its automatic maintenance)


def unwell_of(said: object) -> Unwell | None:
    """An answer's or a row's unwell (None: well, or unreadable)."""
    try:
        return Unwell.from_json(json.loads(said) if isinstance(said, str) and said else said or None)
    except (ValueError, ProtocolError):
        return None


def maintenance_of(said: object) -> Maintenance | None:
    """An answer's or a row's maintenance (None: none, or unreadable: the drain flag still counts)."""
    try:
        return Maintenance.from_json(json.loads(said) if isinstance(said, str) and said else said or None)
    except (ValueError, ProtocolError):
        return None


def heard(answer: dict[str, Any]) -> Heard:
    """The work fields of a health (or drain) answer; a field of the wrong type counts as not said."""

    def count(name: str) -> int | None:
        value = answer.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    draining, version = answer.get("draining"), answer.get("version")
    return Heard(
        draining=draining if isinstance(draining, bool) else None,
        max_jobs=count("max_jobs"),
        jobs_running=count("jobs_running"),
        version=version[:MAX_VERSION_CHARS] if isinstance(version, str) else None,
        maintenance=maintenance_of(answer.get("maintenance")),
        unwell=unwell_of(answer.get("unwell")),
    )


@dataclass(frozen=True)
class AgentReport:
    """One agent as ``GET /agents`` shows it (the router DB's active jobs are added by the caller)."""

    agent_id: str
    url: str
    labels: list[str]
    state: AgentState  # draining shown as such while live or suspect
    last_contact_at: datetime | None
    draining: bool
    max_jobs: int | None
    jobs_running: int | None
    version: str | None
    registered: bool = False  # registered itself (PUT /agents/{id}); else configured in [[agents]]
    maintenance: Maintenance | None = None


class DrainNotDelivered(AgentUnreachable):
    """The agent did not take the drain flag (unreachable, or refused it); the sidecar keeps it."""


def partitioned(*, failing: int, total: int) -> bool:
    """True when more than half of three or more agents (of those not lost already) fail their checks
    at once: that says more about the sidecar's own network (DNS, a policy, a proxy) than about the
    agents, and ending every job in the fleet would turn the sidecar's outage into the loss of all
    work."""
    return total >= 3 and 2 * failing > total


def lost_job_transition(job: JobRecord, reason: str) -> Transition:
    """How a job of a lost agent ends: FAILED, or the status chosen when its stop was requested."""
    if job.status is JobStatus.STOPPING:
        return Transition.finish(
            job.job_id, job.stop_status or JobStatus.FAILED, None, f"{job.reason}; {reason}"
        )
    return Transition.finish(job.job_id, JobStatus.FAILED, None, reason)


@dataclass
class TrackedAgent:
    id: str
    last_contact: float  # monotonic; the sidecar's start counts as contact
    last_contact_at: datetime | None = None  # wall clock of the last answer; None: none since start
    last_check_ok: bool = True
    failed_check_started: float | None = None
    last_error: str = ""
    wrong_identity: str = ""  # why the last agent to answer at its URL was not this one; "": it was
    state: AgentState = AgentState.LIVE
    lost_at: datetime | None = None  # when it was declared lost: jobs submitted later are not its past
    next_check: float = 0.0
    next_sweep: float = 0.0
    next_end: float = 0.0  # while lost: when its active jobs are next read and ended
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    checking: bool = False
    sweeping: bool = False
    heard: Heard = Heard()  # the work fields of its last answer
    drain_wanted: bool | None = None  # asked of the sidecar and not yet confirmed by the agent
    drain_request: DrainRequest | None = None  # its comment and timeout, sent with it
    next_drain_send: float = 0.0
    sending_drain: bool = False
    # Registered agents: liveness from their heartbeats (router DB), no health checks.
    registered: bool = False
    # Its last heartbeat on this process's monotonic clock: the heartbeat's age by the router DB's clock
    # (which wrote it) at the last read, counted back from that read. None: none read yet.
    last_beat: float | None = None
    beat_seen: datetime | None = None  # the row's last_heartbeat_at at the last read
    instance: str = ""
    heartbeat_seconds: float = 10.0
    # Has shown it lives: configured in [[agents]], or a registration followed by a heartbeat. Only
    # those count in the majority that holds back losses.
    confirmed: bool = True
    revoked: bool = False  # a registered agent whose credential an operator revoked
    # How it fences, as it last said (kept across a standby term: terms rarely change, and a stale
    # answer is better than none for a fenced job's FAILED, which waits on them).
    fence: FenceTerms | None = None  # None: not said (not heard yet, or an agent of the release before)
    fence_said: str = ""  # the last complaint logged about its terms ("": none)
    fence_waiting: int = 0  # lost, with this many fenced jobs whose fence may not have fired yet
    outdated: bool = False  # it says a version older than the sidecar works with (as last heard)
    call_token: Secret[str] | None = None  # what it is called with (its registration's)

    @property
    def draining(self) -> bool:
        if self.revoked:  # routed around as a drained agent is
            return True
        return self.drain_wanted if self.drain_wanted is not None else bool(self.heard.draining)

    @property
    def takes_no_work(self) -> bool:
        """Drained, unwell by its own say (a nearly full disk), or outdated: routed around either way."""
        return self.draining or self.heard.unwell is not None or self.outdated


def fenced(agent: TrackedAgent, job: JobRecord) -> bool:
    """Whether the agent fences ``job``: recorded so at submission, or the agent fences every job
    (a replica that did not know its terms then, a standby, recorded what was asked only)."""
    return job.at_most_once or (agent.fence is not None and agent.fence.fenced(False))


def gone_after(agent: TrackedAgent, job: JobRecord) -> float:
    """How long after the agent's last contact the fenced ``job`` has surely ended there: the longer
    of the terms said when it was submitted and those said now; :data:`UNSAID`'s if neither was."""
    known = [job.fence_seconds or 0.0, agent.fence.gone_after() if agent.fence is not None else 0.0]
    return max(known) or UNSAID.gone_after()


def fence_margin(agent: TrackedAgent, config: FleetConfig) -> float:
    """How much later than the sidecar's record the agent's last contact may be."""
    if agent.registered:
        return agent.heartbeat_seconds
    return config.check_interval_seconds + config.check_timeout_seconds


def lost_reason(agent: TrackedAgent, config: FleetConfig, started_at: datetime) -> str:
    since = (
        f"since {agent.last_contact_at.isoformat(timespec='seconds')}"
        if agent.last_contact_at is not None
        else f"since the sidecar started at {started_at.isoformat(timespec='seconds')}"
    )
    error = f"; last error: {agent.last_error}" if agent.last_error else ""
    limit = f"lost_after_seconds={config.lost_after_seconds:g}"
    return f"agent {agent.id} lost: no answer {since} ({limit}){error}"
