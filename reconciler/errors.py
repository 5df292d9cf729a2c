"""Why the sidecar does not serve a request as asked, apart from HTTP: the service layer raises these,
the HTTP layer answers them (:mod:`reconciler.api.server`)."""

from __future__ import annotations


class Refused(Exception):
    """The request cannot be served as asked: ``status`` and the message say why (and ``retry_after``
    when asking again later may work)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class NoRoom(Refused):
    """No agent the route allows may take the job: 503 or 409, as [fleet] when_full says."""


class NoSuchJob(Exception):
    pass
