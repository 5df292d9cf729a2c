"""Whether this agent takes a new job: its capacity (``max_jobs``) and its drain flag.

:meth:`Admission.check` is called by :meth:`agent.jobs.JobManager.run` with no ``await`` between the
check and the job's registration, so two concurrent ``/run`` requests cannot both take the last slot.

The drain flag lives in ``<home>/draining.json``: when, by whom and why the agent was drained, and when
what still runs is to be stopped (:class:`agent_api.maintenance.Maintenance`). Only its presence counts
for draining, so a torn or foreign file still means "draining" (its details then unknown): an agent
restarted while draining stays draining, with its comment and timeout, until it is undrained.
Each change errs towards draining: :meth:`Admission.drain` refuses new
jobs before it writes the file, :meth:`Admission.undrain` takes them again only once the file is gone.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import JobRejected
from agent.jobfiles import write_json_atomic
from agent_api.maintenance import DrainRequest, Maintenance, Unwell
from agent_api.protocol import ProtocolError

__all__ = ["DRAIN_FILE", "FULL_RETRY_AFTER_SECONDS", "Admission"]

log = logging.getLogger(__name__)

DRAIN_FILE = "draining.json"
FULL_RETRY_AFTER_SECONDS = 5  # a slot frees when a job ends: worth asking again soon
UNWELL_RETRY_AFTER_SECONDS = 30  # a disk is freed, a mount comes back: not within seconds


class Admission:
    def __init__(self, *, agent_id: str, max_jobs: int, home: Path) -> None:
        self._agent_id = agent_id
        self.max_jobs = max_jobs  # 0: no limit
        self._flag = home / DRAIN_FILE
        self._draining = False
        self.maintenance: Maintenance | None = None  # who drained it and why (None: not said, or not drained)
        self.unwell: Unwell | None = None  # its automatic maintenance (agent/self_check.py)

    @property
    def draining(self) -> bool:
        return self._draining

    def load(self) -> None:
        """Read the flag at start: a drained agent stays drained across a restart."""
        self._draining = os.path.lexists(self._flag)
        if self._draining:
            self.maintenance = _read(self._flag)
            said = self.maintenance.describe() if self.maintenance else str(self._flag)
            log.warning("agent %s is draining (%s): no new job until undrained", self._agent_id, said)

    def check(self, running: int) -> None:
        """Raise a 503 :class:`JobRejected` if a new job may not start now (``running``: unfinished jobs)."""
        if self._draining:
            raise JobRejected(503, f"agent {self._agent_id} is draining: it takes no new job")
        if self.unwell is not None:
            raise JobRejected(
                503,
                f"agent {self._agent_id} takes no new job until it recovers: {self.unwell.reason}",
                headers={"Retry-After": str(UNWELL_RETRY_AFTER_SECONDS)},
            )
        if self.max_jobs and running >= self.max_jobs:
            raise JobRejected(
                503,
                f"agent {self._agent_id} is full: {running} of max_jobs {self.max_jobs} running",
                headers={"Retry-After": str(FULL_RETRY_AFTER_SECONDS)},
            )

    def set_unwell(self, unwell: Unwell | None) -> None:
        self.unwell = unwell

    def drain(self, request: DrainRequest, *, persist: bool = True) -> None:
        """Take no new job from now on; with ``persist``, across restarts too (a drain asked for stays
        until undrained, while a planned shutdown's must not outlive it: a restart takes jobs again).
        A drain asked again replaces the comment and the timeout, counted from now.

        Raises OSError when the flag cannot be written; the agent drains all the same (until it stops).
        """
        if not persist and self._draining and self.maintenance is not None:
            return  # a planned shutdown of an agent drained already: that drain, and its timeout, stand
        self._draining = True
        self.maintenance = Maintenance.asked(request, now=datetime.now(UTC))
        if persist:
            write_json_atomic(self._flag, self.maintenance.to_json())
        log.info(
            "agent %s %s: it takes no new job until undrained",
            self._agent_id,
            self.maintenance.describe(),
            extra={"action": "agent_drained"},
        )

    def undrain(self) -> None:
        """Take new jobs again. Raises OSError when the flag cannot be removed; the agent stays draining
        then, as it would after a restart."""
        try:
            os.unlink(self._flag)
        except FileNotFoundError:
            pass
        if self._draining:
            log.info("agent %s undrained: it takes new jobs again", self._agent_id)
        self._draining = False
        self.maintenance = None


def _read(flag: Path) -> Maintenance | None:
    """The drain's details, or None when the file is torn or not ours (the agent drains all the same)."""
    try:
        return Maintenance.from_json(json.loads(flag.read_text(encoding="utf-8")))
    except (OSError, ValueError, ProtocolError):
        return None
