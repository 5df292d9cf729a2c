"""The fence: an agent cut off from the sidecar stops its ``at_most_once`` jobs before it is declared lost.

The sidecar declares an agent lost after ``[fleet] lost_after_seconds`` of silence, ends its jobs
``FAILED``, and Airflow may retry them elsewhere. A job that writes to a table, a bucket or a model
registry must then no longer run here: two copies at once corrupt what they write (HTCondor's job
lease makes the same promise). So the agent counts how long it has not heard from the sidecar, and
once that passes ``[agent] fence_after_seconds`` it stops every unfinished job that asked for it
(``at_most_once``, or ``[agent] at_most_once_default``), as any stop does (SIGTERM, ``grace_seconds``,
SIGKILL, :mod:`agent.stopping`), with the reason ``fenced: no contact with the sidecar since <time>``.
The job's end reaches the sidecar as any end does, once contact returns: the next accepted heartbeat
carries it, and the sidecar's catch-up read finds it. Other jobs are never fenced: an outage of every
sidecar replica, or of the router DB, longer than the fence stops the fenced jobs, which might
otherwise have lived through it; that cost is the job's choice. While cut off, the agent refuses a new
``at_most_once`` job (503: nothing is recorded, the sidecar may place it elsewhere).

This module decides, and does no I/O: :class:`Fence` is told of each contact (:meth:`Fence.heard`)
and says whether the agent is cut off now (:meth:`Fence.cut_off`); both clocks are injected, so the
decision is tested without waiting. :class:`agent.jobs.JobManager` asks it every
:func:`check_period` and carries out the stops.

What counts as contact ("heard from the sidecar"):

- an agent that registers (``router_url``): a heartbeat the sidecar accepted (HTTP 200), as of the
  moment it was *sent*. The sidecar records a heartbeat between its sending and its answer, so the
  send time is never later than the sidecar's own record of it, from which its ``lost_after_seconds``
  counts: the fence fires at most ``fence_after_seconds`` plus one :func:`check_period` after the
  sidecar's last record of this agent, and the job is gone ``grace_seconds`` later. Only heartbeats
  count: the sidecar judges a registered agent by them alone, so a call from the sidecar that
  reaches the agent proves nothing of what the sidecar thinks of it.
- an agent in the sidecar's ``[[agents]]`` (no ``router_url``): a health check that carries one of
  its tokens (``GET /health``), on its arrival. Only the leading replica checks health, and judges such
  an agent by it alone; its other calls, and a standby's (a ``/run``, a log read), say nothing of what
  the leader thinks, so they do not count. ``/healthz`` without a token does not count either: anyone
  may ask it. A failover counts as silence until the new leader's first check: keep ``[leader]
  lease_seconds`` well under ``fence_after_seconds``.

How each fault defeats the fence, or does not:

- A partition, both ways: no heartbeat is accepted; the fence fires ``fence_after_seconds`` after
  the last accepted one was sent. The sidecar declares the agent lost ``lost_after_seconds`` after
  its record of that heartbeat: with ``lost_after_seconds`` above ``fence_after_seconds`` +
  ``grace_seconds`` + one heartbeat (for an ``[[agents]]`` agent: one ``check_interval_seconds``),
  the job is gone first.
- A one-way cut: TCP needs both directions for every connection, so a heartbeat whose answer is lost
  is not accepted, and counts as silence, even though the sidecar recorded it (the agent then fences
  early, the safe side). For an ``[[agents]]`` agent, a health check already under way on an open
  connection may still arrive after the cut: it counts, and delays the fence by up to one check.
- The sidecar down, paused (SIGSTOP), or unable to record (router DB down: its answer is a 503):
  the same as a partition. A sidecar paused longer than ``fence_after_seconds`` but shorter than
  ``lost_after_seconds`` declares nobody lost, yet the fenced jobs were stopped: the cost of the
  choice. HA replicas behind ``router_url`` keep heartbeats answered while one replica is down; a
  PostgreSQL failover must end within ``fence_after_seconds`` less a heartbeat.
- A wall-clock step: every duration here is measured on the boot clock (``CLOCK_BOOTTIME``), which a
  step does not move; the wall clock only dates the reason.
- The VM suspended (or live-migrated with a long pause): the boot clock counts the suspension,
  ``CLOCK_MONOTONIC`` would not. On resume the agent sees the silence and fences at its next check;
  the jobs, frozen with it, run on for one check period and the grace.
- The agent paused (SIGSTOP) or its event loop starved, while its jobs run on: nobody watches them
  meanwhile. On resume the agent fences if the silence passed ``fence_after_seconds``, even when the
  first heartbeat after it is accepted (:meth:`Fence.heard` keeps such a missed deadline until it is
  carried out). The sidecar may have declared the agent lost during the pause and a retry may run
  elsewhere: fencing at once ends the overlap soonest, while waiting for a heartbeat's answer would
  not tell whether the sidecar gave up (its orphan sweep stops the job later, not at once). A pause
  between ``fence_after_seconds`` and ``lost_after_seconds`` thus stops jobs the sidecar still
  counted as running: the safe side. A pause beyond ``lost_after_seconds`` is not covered: the
  overlap lasts until the resume plus one check and the grace.
- The agent restarted: contact counts from the start of the new process, so adopted jobs are
  neither fenced at once nor never; without contact they are fenced ``fence_after_seconds`` after
  the start. A fence the previous process had begun resumes as any interrupted stop
  (:mod:`agent.adoption`). Not covered: the agent dead (its jobs run on unwatched until it is
  restarted), or restarted over and over faster than ``fence_after_seconds`` while cut off (each
  start counts afresh). A lease kept by each job's supervisor would close both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agent import procfs
from agent_api.fencing import check_period

__all__ = ["FENCE_REASON", "Fence", "Silence", "check_period"]

FENCE_REASON = "fenced: no contact with the sidecar since"


@dataclass(frozen=True)
class Silence:
    """No contact since ``since`` (the boot clock), dated ``since_wall``, for ``lasted`` seconds."""

    since: float
    since_wall: datetime
    lasted: float
    fence_after: float

    @property
    def reason(self) -> str:
        """What a fenced job records: its ``reason``, the sidecar's too once the end reaches it."""
        when = self.since_wall.isoformat(timespec="seconds")
        limit = f"[agent] fence_after_seconds {self.fence_after:g}"
        return f"{FENCE_REASON} {when} ({self.lasted:.0f} s > {limit})"


class Fence:
    """How long the agent has not heard from the sidecar, and whether that passed ``fence_after``.

    ``fence_after`` 0: never cut off. ``clock``: a monotonic clock that counts a suspended VM's time
    (default: the boot clock); ``wall``: dates the silence in the reason. Contact counts from the
    creation (the agent's start)."""

    def __init__(
        self,
        fence_after: float,
        *,
        clock: Callable[[], float] = procfs.boot_clock,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.fence_after = fence_after
        self._clock = clock
        self._wall = wall
        self._last = clock()
        self._missed: Silence | None = None  # a silence past the fence that nobody saw while it lasted
        self._fenced: float | None = None  # the start of the last silence whose fence was carried out

    @property
    def enabled(self) -> bool:
        return self.fence_after > 0

    def now(self) -> float:
        """The clock contacts are told in (:meth:`heard`)."""
        return self._clock()

    def heard(self, at: float | None = None) -> None:
        """The sidecar was heard from at ``at`` (default: now): for a heartbeat, when it was sent.

        A contact that ends a silence longer than ``fence_after`` does not undo it: the silence
        happened, the sidecar may have given up meanwhile, so the fence is still due (see the module)."""
        at = self._clock() if at is None else at
        unseen = self._missed is None and self._fenced != self._last
        if self.enabled and unseen and at - self._last > self.fence_after:
            self._missed = self._silence(self._last, at - self._last)
        self._last = max(self._last, at)

    def cut_off(self) -> Silence | None:
        """The silence the agent must fence for now, or None: its last contact is older than
        ``fence_after``, or a contact came after such a silence and the fence was not carried out."""
        if not self.enabled:
            return None
        if self._missed is not None:
            return self._missed
        lasted = self._clock() - self._last
        return self._silence(self._last, lasted) if lasted > self.fence_after else None

    def carried_out(self, silence: Silence) -> None:
        """The fence for ``silence`` was carried out (its stops begun): a missed one is done with, and
        the contact that ends it needs no fence again."""
        self._fenced = silence.since
        if self._missed is not None and self._missed.since == silence.since:
            self._missed = None

    def _silence(self, since: float, lasted: float) -> Silence:
        since_wall = self._wall() - timedelta(seconds=self._clock() - since)
        return Silence(since=since, since_wall=since_wall, lasted=lasted, fence_after=self.fence_after)
