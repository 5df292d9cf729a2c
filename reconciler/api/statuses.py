"""The one table from the sidecar's refusals (:mod:`reconciler.errors`) to HTTP statuses."""

from __future__ import annotations

from reconciler.errors import (
    AgentUnreachable,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    NotFound,
    Refused,
    TooMany,
    Unauthenticated,
    Unavailable,
    Unverified,
)

# In order: the first kind an error is decides (NoRoomForNow is Unavailable before it is anything else).
STATUSES: tuple[tuple[type[Refused], int], ...] = (
    (Invalid, 400),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Unavailable, 503),
    (Conflict, 409),
    (Gone, 410),
    (Unverified, 422),
    (TooMany, 429),
    (AgentUnreachable, 502),
)


def status_of(refused: Refused) -> int:
    """The HTTP status that answers ``refused`` (500 for a kind the table lacks: a defect)."""
    return next((status for kind, status in STATUSES if isinstance(refused, kind)), 500)
