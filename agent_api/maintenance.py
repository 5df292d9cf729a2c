"""An agent in maintenance: drained, with who drained it, when, why, and how long its jobs may run on.

A drain (``POST /drain`` on the agent, ``POST /agents/{id}/drain`` on the sidecar, ``agentic agents
maintenance`` or ``drain``) may carry a comment and a timeout. The agent keeps all of it in its home,
so it survives the agent's restarts, and says it in ``/healthz``, in each heartbeat and in the drain's
answer: the sidecar shows it (``GET /agents``, ``agentic agents list``, ``/ui/agents``) after its own
restarts too. With a timeout, the agent stops whatever still runs once ``stop_at`` has passed (each
job's reason names the drain), and the tasks fail and may retry elsewhere. ``stop_at`` is a wall-clock
time, kept across restarts: a step of the agent's clock moves it by as much.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agent_api.errors import ProtocolError

MAX_COMMENT_CHARS = 500
MAX_BY_CHARS = 200
MAX_DRAIN_TIMEOUT_SECONDS = 30 * 86400.0
MAX_UNWELL_CHARS = 1000


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _hidden(ch: str) -> bool:
    """A character that is not shown as itself: a control, a lone surrogate, or a bidi control, which
    can reorder what a terminal shows of the text around it."""
    return ch in BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Cs")


def _text(obj: dict[str, Any], key: str, limit: int) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{key} must be a string of at most {limit} characters")
    if any(_hidden(ch) for ch in value):  # NUL, escapes, lone surrogates, bidi overrides
        raise ProtocolError(f"{key} must not contain control or format characters")
    return value


def _moment(obj: dict[str, Any], key: str) -> datetime | None:
    value = obj.get(key)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ProtocolError(f"{key} must be an ISO 8601 time with its offset")
    return moment


@dataclass(frozen=True)
class DrainRequest:
    """The body of a drain: all optional. ``by``: who asked (the sidecar adds the caller it knows)."""

    comment: str = ""
    by: str = ""
    timeout_seconds: float | None = None  # then stop what still runs; None: let it run

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.comment:
            body["comment"] = self.comment
        if self.by:
            body["by"] = self.by
        if self.timeout_seconds is not None:
            body["timeout_seconds"] = self.timeout_seconds
        return body

    @classmethod
    def from_json(cls, value: object) -> DrainRequest:
        """Other keys are ignored (a drain's body was free before these)."""
        if not isinstance(value, dict):
            raise ProtocolError("request body must be a JSON object, or empty")
        timeout = value.get("timeout_seconds")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_DRAIN_TIMEOUT_SECONDS  # first: an int of 400 digits is no float
            or not math.isfinite(timeout)
        ):
            raise ProtocolError(
                f"timeout_seconds must be a number above 0, at most {MAX_DRAIN_TIMEOUT_SECONDS:g}"
            )
        return cls(
            comment=_text(value, "comment", MAX_COMMENT_CHARS),
            by=_text(value, "by", MAX_BY_CHARS),
            timeout_seconds=float(timeout) if timeout is not None else None,
        )


@dataclass(frozen=True)
class Maintenance:
    """A drain as the agent keeps it; ``stop_at`` None: running jobs go on as long as they like."""

    since: datetime
    by: str = ""
    comment: str = ""
    stop_at: datetime | None = None

    @classmethod
    def asked(cls, request: DrainRequest, *, now: datetime) -> Maintenance:
        timeout = request.timeout_seconds
        stop_at = now + timedelta(seconds=timeout) if timeout is not None else None
        return cls(since=now, by=request.by, comment=request.comment, stop_at=stop_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "by": self.by,
            "comment": self.comment,
            "stop_at": self.stop_at.isoformat() if self.stop_at is not None else None,
        }

    @classmethod
    def from_json(cls, value: object) -> Maintenance | None:
        """None for null or absent (not draining, or an agent older than maintenance)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ProtocolError("maintenance must be an object or null")
        since = _moment(value, "since")
        if since is None:
            raise ProtocolError("maintenance.since is required")
        return cls(
            since=since,
            by=_text(value, "by", MAX_BY_CHARS),
            comment=_text(value, "comment", MAX_COMMENT_CHARS),
            stop_at=_moment(value, "stop_at"),
        )

    def timed_out(self, now: datetime) -> bool:
        return self.stop_at is not None and now >= self.stop_at

    def describe(self) -> str:
        """One line: by whom, since when, why, and the timeout."""
        said = f"drained by {self.by or 'someone'} since {self.since.isoformat(timespec='seconds')}"
        if self.comment:
            said += f": {self.comment}"
        if self.stop_at is not None:
            said += f" (what still runs is stopped at {self.stop_at.isoformat(timespec='seconds')})"
        return said


@dataclass(frozen=True)
class Unwell:
    """Why an agent takes no new job by itself (a nearly full disk, an unwritable home), and since when:
    its automatic maintenance, which ends when the cause does (``agent/self_check.py``)."""

    reason: str
    since: datetime

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since.isoformat()}

    @classmethod
    def from_json(cls, value: object) -> Unwell | None:
        """None for null or absent (well, or an agent older than the self-check)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ProtocolError("unwell must be an object or null")
        since = _moment(value, "since")
        if since is None:
            raise ProtocolError("unwell.since is required")
        return cls(reason=_text(value, "reason", MAX_UNWELL_CHARS), since=since)

    def as_maintenance(self) -> Maintenance:
        """How the sidecar shows it: a maintenance the agent set itself."""
        return Maintenance(since=self.since, by="the agent itself, until it recovers", comment=self.reason)
