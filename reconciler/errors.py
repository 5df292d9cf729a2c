"""Why the sidecar does not serve a request as asked, apart from HTTP: the core and the fleet raise these
kinds, and the HTTP layer answers each with its status (:data:`reconciler.api.statuses.STATUSES`, one
table). ``retry_after`` says when asking again may work."""

from __future__ import annotations


class Refused(Exception):
    """The request cannot be served as asked; the message says why."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Invalid(Refused):
    """The request is wrong as it stands: asking again unchanged cannot work."""


class Unauthenticated(Refused):
    """It proves no identity the sidecar takes (a credential unknown or expired)."""


class Forbidden(Refused):
    """Who asks may not do this (outside the registration scope, a revoked credential)."""


class NotFound(Refused):
    """What it names does not exist."""


class NoSuchJob(NotFound):
    """The job id names no job."""


class Conflict(Refused):
    """It contradicts what is recorded (an id another agent holds, a job that cannot move so)."""


class Gone(Refused):
    """What it asks for existed and can no longer be reached (a job whose agent is not configured)."""


class Unverified(Refused):
    """What it claims could not be checked (an agent's URL that does not answer as that agent)."""


class TooMany(Refused):
    """Too many such requests at once: retry after ``retry_after``."""


class AgentUnreachable(Refused):
    """The agent it needs did not answer, or not as itself."""


class Unavailable(Refused):
    """The sidecar cannot serve it now (an agent lost, the router DB down): retry."""


class NoRoom(Refused):
    """No agent the route allows may take the job now."""


class NoRoomForNow(NoRoom, Unavailable):
    """No room, and ``[fleet] when_full = "wait"``: the operator asks again."""


class NoRoomAtAll(NoRoom, Conflict):
    """No room, and ``[fleet] when_full = "refuse"``: the task fails now."""
