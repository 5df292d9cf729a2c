"""The trigger an :class:`AgenticRunOperator` defers on: polls the sidecar until the job ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
from airflow.triggers.base import BaseTrigger, TriggerEvent

from agentic_airflow.connection import aget_endpoint
from agentic_airflow.sidecar import TERMINAL, SidecarError, get_job, log_tail


class AgenticJobTrigger(BaseTrigger):
    def __init__(
        self, job_id: str, conn_id: str, poll_interval: float = 2.0, log_tail_bytes: int = 4000
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.conn_id = conn_id
        self.poll_interval = poll_interval
        self.log_tail_bytes = log_tail_bytes

    def serialize(self) -> tuple[str, dict[str, Any]]:
        # Only ids go into Airflow's trigger table; the token is resolved from the connection.
        return (
            "agentic_airflow.triggers.AgenticJobTrigger",
            {
                "job_id": self.job_id,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "log_tail_bytes": self.log_tail_bytes,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        endpoint = await aget_endpoint(self.conn_id)
        # Building a client loads the CA bundle (tens of ms, more under load): off the triggerer's
        # event loop, which every other trigger shares.
        verify = await asyncio.to_thread(endpoint.verify)
        client = await asyncio.to_thread(
            httpx.AsyncClient,
            base_url=endpoint.base_url,
            headers=endpoint.headers,
            timeout=10.0,
            verify=verify,
        )
        async with client:
            while True:
                try:
                    job = await get_job(client, self.job_id)
                except SidecarError as exc:
                    yield TriggerEvent({"job_id": self.job_id, "status": "ERROR", "error": str(exc)})
                    return
                except httpx.HTTPError as exc:
                    # The sidecar restarting or briefly unreachable: keep waiting, the job runs on.
                    self.log.warning("sidecar unreachable (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(self.poll_interval)
                    continue
                if job["status"] in TERMINAL:
                    tail = (
                        ""
                        if job["status"] == "SUCCEEDED"
                        else await log_tail(client, self.job_id, self.log_tail_bytes)
                    )
                    yield TriggerEvent({**_summary(job), "log_tail": tail})
                    return
                await asyncio.sleep(self.poll_interval)


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in ("job_id", "status", "rc", "reason", "agent_id", "finished_at")}
