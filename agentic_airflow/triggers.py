"""The trigger an :class:`AgenticRunOperator` defers on: polls the sidecar until the job ends, and
appends the job's new output to the task's log while it runs.

The waiting itself is :class:`agentic_airflow.polling.JobPoller` (no Airflow there): only the job's
terminal status, or the sidecar's own answer that it has no such job, ends the task; every transient
answer is logged to the task's log and retried with backoff. On Airflow 3.3+, a person's action on the
deferred task (mark failed or success, clear) reaches the sidecar at once through :meth:`on_kill`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from agentic_airflow.connection import aget_endpoint
from agentic_airflow.polling import OUTPUT_CHUNK_BYTES, JobPoller, report_kill


class AgenticJobTrigger(BaseTrigger):
    """``log_offset``: where the task's log starts showing the job's output (None: it does not).
    Airflow never writes a running trigger back to its table, so a trigger started again (another
    triggerer) gets the deferral's offset; the job's agent keeps how far the last one got (the read's
    ``cursor``), and the output goes on from there, neither repeated nor lost."""

    def __init__(
        self,
        job_id: str,
        conn_id: str,
        poll_interval: float = 2.0,
        log_tail_bytes: int = 4000,
        log_offset: int | None = 0,
        output_chunk_bytes: int = OUTPUT_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.conn_id = conn_id
        self.poll_interval = poll_interval
        self.log_tail_bytes = log_tail_bytes
        self.log_offset = log_offset
        self.output_chunk_bytes = output_chunk_bytes
        self._poller: JobPoller | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        # Only ids go into Airflow's trigger table; the token is resolved from the connection.
        return (
            "agentic_airflow.triggers.AgenticJobTrigger",
            {
                "job_id": self.job_id,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "log_tail_bytes": self.log_tail_bytes,
                "log_offset": self._poller.log_offset if self._poller is not None else self.log_offset,
                "output_chunk_bytes": self.output_chunk_bytes,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self._poller = JobPoller(
            job_id=self.job_id,
            conn_id=self.conn_id,
            resolve=aget_endpoint,
            log=self.log,
            poll_interval=self.poll_interval,
            log_tail_bytes=self.log_tail_bytes,
            log_offset=self.log_offset,
            output_chunk_bytes=self.output_chunk_bytes,
        )
        yield TriggerEvent(await self._poller.run())

    async def on_kill(self) -> None:
        """Airflow 3.3+ calls this when a person marks the deferred task failed or success, or clears
        it (never on a triggerer's shutdown or a trigger's move to another triggerer): the sidecar
        hears of it now and stops the job once its own read of Airflow confirms. Older Airflows never
        call it; their tasks' jobs are stopped by the sidecar's poll alone."""
        await report_kill(job_id=self.job_id, conn_id=self.conn_id, resolve=aget_endpoint, log=self.log)
