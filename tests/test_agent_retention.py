"""Finished jobs' directories go in due time, so a VM's disk stays bounded; a running job, or one whose
outcome nobody has read, stays. The rules (fast), then a real agent applying them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from agent.retention import Budget, Finished, to_remove
from harness.agent import AgentProcess
from harness.processes import wait_until

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
DAY = 86400.0
BUDGET = Budget(keep_seconds=7 * DAY, unread_seconds=30 * DAY, max_jobs=0, max_bytes=0)


def ended(job_id: str, days_ago: float, *, read: bool = True, size: int = 100) -> Finished:
    return Finished(job_id, NOW - timedelta(days=days_ago), read, size)


@pytest.mark.fast
def test_read_jobs_go_after_the_retention_period_unread_ones_after_the_long_one() -> None:
    jobs = [
        ended("read-old", 8),
        ended("read-young", 6),
        ended("unread-old", 8, read=False),
        ended("unread-ancient", 31, read=False),
    ]
    assert to_remove(jobs, BUDGET, now=NOW) == ["unread-ancient", "read-old"]  # oldest first


@pytest.mark.fast
def test_budgets_remove_the_oldest_read_jobs_first_and_never_an_unread_one() -> None:
    jobs = [ended("a", 3), ended("b", 2, read=False), ended("c", 1), ended("d", 0.5)]
    by_count = Budget(keep_seconds=7 * DAY, unread_seconds=30 * DAY, max_jobs=2, max_bytes=0)
    assert to_remove(jobs, by_count, now=NOW) == ["a", "c"]  # "b" is unread: kept, over budget or not
    by_bytes = Budget(keep_seconds=7 * DAY, unread_seconds=30 * DAY, max_jobs=0, max_bytes=250)
    assert to_remove(jobs, by_bytes, now=NOW) == ["a", "c"]
    assert to_remove(jobs, BUDGET, now=NOW) == []  # no limits, all young


def get(agent: AgentProcess, path: str) -> httpx.Response:
    return httpx.get(f"{agent.url}{path}", headers={"Authorization": f"Bearer {agent.token}"}, timeout=5)


def run(agent: AgentProcess, job_id: str, command: str) -> None:
    body = {"job_id": job_id, "payload": {"command": command}}
    answer = httpx.post(f"{agent.url}/run", json=body, headers={"Authorization": f"Bearer {agent.token}"})
    assert answer.status_code == 201, answer.text


def finished_ids(agent: AgentProcess) -> set[str]:
    """Without reading any job's outcome (a list does not count as reading it)."""
    return {j["job_id"] for j in get(agent, "/jobs?status=SUCCEEDED").json()["jobs"]}


def test_a_real_agent_removes_read_jobs_keeps_unread_and_running_ones(tmp_path: Path) -> None:
    retention = (
        "retain_finished_seconds = 1.0\nretain_unread_seconds = 3600.0\nretention_check_seconds = 0.2\n"
    )
    with AgentProcess(tmp_path / "home", extra_config=retention) as agent:
        run(agent, "read-me", "echo done")
        run(agent, "nobody-asked", "echo done")
        run(agent, "still-running", "sleep 600")
        wait_until(lambda: finished_ids(agent) == {"read-me", "nobody-asked"}, timeout=10, what="both ended")
        assert get(agent, "/jobs/read-me").json()["status"] == "SUCCEEDED"  # its outcome is read now
        jobs = tmp_path / "home" / "jobs"
        wait_until(lambda: not (jobs / "read-me").exists(), timeout=10, what="the read job removed")
        assert get(agent, "/jobs/read-me").status_code == 404
        time.sleep(1.5)  # well past retain_finished_seconds: the unread one and the running one stay
        assert (jobs / "nobody-asked").is_dir() and (jobs / "still-running").is_dir()
        health = get(agent, "/healthz").json()
        assert health["jobs_retained"] == 1 and health["retained_bytes"] > 0
