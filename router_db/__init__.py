"""The router database: jobs, their task-instance keys, the audit trail of every status change, and the
agents registered with the sidecar.

Everything that reads or writes jobs goes through :class:`RouterDB`; there is no SQL elsewhere.
"""

from router_db.records import (
    AgentConflict,
    AgentRecord,
    EventRecord,
    JobRecord,
    NewJob,
    NotRegistered,
    TaskInstanceKey,
)
from router_db.store import RouterDB
from router_db.transitions import StaleTransition, Transition
from sidecar_api.protocol import JobStatus

__all__ = [
    "AgentConflict",
    "AgentRecord",
    "EventRecord",
    "JobRecord",
    "JobStatus",
    "NewJob",
    "NotRegistered",
    "RouterDB",
    "StaleTransition",
    "TaskInstanceKey",
    "Transition",
]
