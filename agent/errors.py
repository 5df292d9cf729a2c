"""Requests the agent refuses: each refusal carries the HTTP status the server answers with."""

from __future__ import annotations

from collections.abc import Mapping


class JobRejected(Exception):
    """The request cannot be carried out; nothing was changed. ``status`` is the HTTP status,
    ``headers`` go with the answer (``Retry-After`` when the agent is full)."""

    def __init__(self, status: int, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class UnknownJob(JobRejected):
    def __init__(self, job_id: str) -> None:
        super().__init__(404, f"job {job_id!r} is not known to this agent")


class UnreadableJob(JobRejected):
    """A job directory this agent has but whose state it cannot load (skipped at adoption): its
    process may run, so the job is neither known nor forgotten, and nothing may be written over it."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            500, f"job {job_id!r} has a directory on this agent whose state cannot be read (see its log)"
        )
