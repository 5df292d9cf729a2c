"""The router database: jobs, their task-instance keys, and the audit trail of every status change.

Everything that reads or writes jobs goes through :class:`RouterDB`; there is no SQL elsewhere.
"""

from router_db.records import EventRecord, JobRecord, NewJob, TaskInstanceKey
from router_db.store import RouterDB
from router_db.transitions import StaleTransition, Transition
from sidecar_api.protocol import JobStatus

__all__ = [
    "EventRecord",
    "JobRecord",
    "JobStatus",
    "NewJob",
    "RouterDB",
    "StaleTransition",
    "TaskInstanceKey",
    "Transition",
]
