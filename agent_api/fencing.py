"""An agent's fence terms, as both sides read them: the agent says them, the sidecar waits on them.

An agent stops its ``at_most_once`` jobs once it has not heard from the sidecar for
``after_seconds`` (``agent/fence.py``); every job is ``at_most_once`` there with ``default``. The agent
notices at most one :func:`check_period` late, and each stop takes up to ``grace_seconds`` (SIGTERM,
then SIGKILL). So a fenced job is surely gone :meth:`FenceTerms.gone_after` seconds after the
agent's last contact; the sidecar adds how much later than its own record that contact may be (one
heartbeat, or one health check), and ends such a job ``FAILED`` no sooner: a retry elsewhere then
never overlaps it. The agent says its terms in each heartbeat and in ``/healthz``; an agent of the
release before says none (:meth:`FenceTerms.from_json` gives None), though it fences at
:data:`UNSAID` at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent_api.errors import ProtocolError

MAX_CHECK_SECONDS = 1.0
MAX_TERM_SECONDS = 7 * 86400.0  # a fence or a grace longer than a week is a mistake, not a setting


def check_period(fence_after: float) -> float:
    """How often the agent asks whether it is cut off: the fence fires at most this late."""
    return min(MAX_CHECK_SECONDS, fence_after / 10)


@dataclass(frozen=True)
class FenceTerms:
    """``after_seconds`` 0: the agent fences nothing."""

    after_seconds: float = 0.0
    grace_seconds: float = 0.0
    default: bool = False

    @property
    def fences(self) -> bool:
        return self.after_seconds > 0

    def fenced(self, asked: bool) -> bool:
        """Whether a job that ``asked`` for it (``at_most_once``) is fenced by this agent."""
        return self.fences and (asked or self.default)

    def gone_after(self) -> float:
        """Seconds after the agent's last contact by which every fenced job has surely ended there."""
        return self.after_seconds + check_period(self.after_seconds) + self.grace_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "after_seconds": self.after_seconds,
            "grace_seconds": self.grace_seconds,
            "default": self.default,
        }

    @classmethod
    def from_json(cls, value: object) -> FenceTerms | None:
        """The ``fence`` field of a heartbeat or a health answer; None when absent (an older agent)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ProtocolError("fence must be an object")
        seconds = []
        for name in ("after_seconds", "grace_seconds"):
            number = value.get(name, 0.0)
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise ProtocolError(f"fence.{name} must be a number")
            if not (0 <= number <= MAX_TERM_SECONDS and math.isfinite(number)):  # an int of 400 digits too
                raise ProtocolError(f"fence.{name} must be between 0 and {MAX_TERM_SECONDS:g}")
            seconds.append(float(number))
        default = value.get("default", False)
        if not isinstance(default, bool):
            raise ProtocolError("fence.default must be true or false")
        return cls(after_seconds=seconds[0], grace_seconds=seconds[1], default=default)


# What an agent that has not said its terms is taken to fence at: the previous release's defaults
# (fence_after_seconds 60, grace_seconds 10). A lost agent's at_most_once jobs wait this long when
# nothing better is known (an [[agents]] agent unreachable since this sidecar started, and whose terms
# no job recorded, or an agent of the previous release). One configured beyond them is not covered.
UNSAID = FenceTerms(after_seconds=60.0, grace_seconds=10.0)
