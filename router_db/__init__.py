"""The router database: jobs, their task-instance keys, and the audit trail of every status change.

Everything that reads or writes jobs goes through :class:`RouterDB`; there is no SQL elsewhere.
"""

from router_db.models import ACTIVE_STATUSES, TERMINAL_STATUSES, JobStatus
from router_db.store import (
    EventRecord,
    JobRecord,
    NewJob,
    RouterDB,
    StaleTransition,
    TaskInstanceKey,
    Transition,
)

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "EventRecord",
    "JobRecord",
    "JobStatus",
    "NewJob",
    "RouterDB",
    "StaleTransition",
    "TaskInstanceKey",
    "Transition",
]
