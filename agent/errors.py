"""Requests the agent refuses: each refusal carries the HTTP status the server answers with."""

from __future__ import annotations


class JobRejected(Exception):
    """The request cannot be carried out; nothing was changed. ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UnknownJob(JobRejected):
    def __init__(self, job_id: str) -> None:
        super().__init__(404, f"job {job_id!r} is not known to this agent")
