"""The router DB's clock: the one clock for times that one process writes and another compares.

Replicas' wall clocks may disagree by minutes. So a time written for another process to judge (a
heartbeat, a job's ``updated_at``, a lease's expiry) and the "now" it is judged against both come from
the database: PostgreSQL's ``now()`` (the server's clock, at the transaction's start), or SQLite's
``'now'``. SQLite runs inside each process that opens the file, so its clock is that process's own: it
keeps processes in step only because they share one machine, and one clock, with the file.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, literal_column, type_coerce

from router_db.models import UTCDateTime

# SQLite: the text SQLAlchemy stores for a datetime (microseconds; SQLite's clock gives milliseconds),
# so that stored times and this clock's compare as text in time order.
SQLITE_FORMAT = "%Y-%m-%d %H:%M:%f000"


def db_now(dialect: str, plus_seconds: float | ColumnElement[Any] = 0.0) -> ColumnElement[datetime]:
    """The router DB's time now, plus ``plus_seconds`` (a number or a bound parameter), as SQL; typed
    so that selecting it gives a UTC-aware datetime."""
    if dialect == "sqlite":
        shift = func.printf("%+.3f seconds", plus_seconds)
        clock: ColumnElement[Any] = func.strftime(SQLITE_FORMAT, "now", shift)
    else:
        clock = func.now() + literal_column("interval '1 second'") * plus_seconds
    return type_coerce(clock, UTCDateTime())
