"""Whether this agent takes a new job: its capacity (``max_jobs``) and its drain flag.

:meth:`Admission.check` is called by :meth:`agent.jobs.JobManager.run` with no ``await`` between the
check and the job's registration, so two concurrent ``/run`` requests cannot both take the last slot.

The drain flag lives in ``<home>/draining.json`` (when and why the agent was drained; only its presence
counts, so a torn or foreign file still means "draining"): an agent restarted while draining stays
draining until it is undrained. Each change errs towards draining: :meth:`Admission.drain` refuses new
jobs before it writes the file, :meth:`Admission.undrain` takes them again only once the file is gone.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import JobRejected
from agent.jobfiles import write_json_atomic

__all__ = ["DRAIN_FILE", "FULL_RETRY_AFTER_SECONDS", "Admission"]

log = logging.getLogger(__name__)

DRAIN_FILE = "draining.json"
FULL_RETRY_AFTER_SECONDS = 5  # a slot frees when a job ends: worth asking again soon


class Admission:
    def __init__(self, *, agent_id: str, max_jobs: int, home: Path) -> None:
        self._agent_id = agent_id
        self.max_jobs = max_jobs  # 0: no limit
        self._flag = home / DRAIN_FILE
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    def load(self) -> None:
        """Read the flag at start: a drained agent stays drained across a restart."""
        self._draining = os.path.lexists(self._flag)
        if self._draining:
            log.warning("agent %s is draining (%s): no new job until undrained", self._agent_id, self._flag)

    def check(self, running: int) -> None:
        """Raise a 503 :class:`JobRejected` if a new job may not start now (``running``: unfinished jobs)."""
        if self._draining:
            raise JobRejected(503, f"agent {self._agent_id} is draining: it takes no new job")
        if self.max_jobs and running >= self.max_jobs:
            raise JobRejected(
                503,
                f"agent {self._agent_id} is full: {running} of max_jobs {self.max_jobs} running",
                headers={"Retry-After": str(FULL_RETRY_AFTER_SECONDS)},
            )

    def drain(self, *, by: str, persist: bool = True) -> None:
        """Take no new job from now on; with ``persist``, across restarts too (a drain asked for stays
        until undrained, while a planned shutdown's must not outlive it: a restart takes jobs again).

        Raises OSError when the flag cannot be written; the agent drains all the same (until it stops).
        """
        self._draining = True
        if persist:
            write_json_atomic(self._flag, {"since": datetime.now(UTC).isoformat(), "by": by})
        log.info("agent %s draining (%s): it takes no new job until undrained", self._agent_id, by)

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
