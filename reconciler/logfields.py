"""``extra=`` fields that put a router-DB job's identifiers on a log line."""

from __future__ import annotations

from typing import Any


def job_fields(job: Any, **more: Any) -> dict[str, Any]:
    """``extra=`` fields for a router-DB job record."""
    key = job.key
    return {
        "job_id": job.job_id,
        "dag_id": key.dag_id,
        "task_id": key.task_id,
        "run_id": key.run_id,
        "map_index": key.map_index,
        "try_number": key.try_number,
        "agent_id": job.agent_id,
        **more,
    }
