"""A new try's submission stops the older try's job at once, without waiting for a poll to notice.

The sidecar polls Airflow (a stand-in here) only once a minute, and the stand-in never reports the
task instance as changed: only the submission of try 2 can tell the sidecar that try 1 is over.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.agent import AgentProcess
from harness.processes import wait_until
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

KEY = ("d", "r", "t", -1)  # (dag_id, run_id, task_id, map_index)
SLOW_POLL = 60.0


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    served.standin.add(*KEY, state="deferred", try_number=1)
    served.start()
    yield served
    served.stop()


def body(try_number: int, **more: Any) -> dict[str, Any]:
    dag_id, run_id, task_id, map_index = KEY
    return {
        "command": "sleep 600",
        "agent_id": "agent-1",
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": run_id,
        "map_index": map_index,
        "try_number": try_number,
        **more,
    }


def retry_in_airflow(airflow: ServedAirflow, try_number: int) -> None:
    """The task was cleared and its next try is running; ``updated_at`` left as it was, so no
    incremental read would see it."""

    def change() -> None:
        row = airflow.standin.rows[KEY]
        row.try_number, row.state = try_number, "running"

    airflow.call_soon(change)


@contextmanager
def slow_polling_sidecar(tmp_path: Path, airflow: ServedAirflow) -> Iterator[httpx.Client]:
    """A real agent and a sidecar that reads Airflow once a minute; a client of the sidecar."""
    with (
        AgentProcess(home=tmp_path / "agent", agent_id="agent-1", grace_seconds=2.0) as agent,
        SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            api_version="v2",
            interval_seconds=SLOW_POLL,
            full_resync_seconds=SLOW_POLL,
        ) as sidecar,
        sidecar.client() as client,
    ):
        yield client


def test_submitting_try_2_stops_try_1_at_once(tmp_path: Path, airflow: ServedAirflow) -> None:
    with slow_polling_sidecar(tmp_path, airflow) as client:
        first = client.post("/jobs", json=body(1)).json()
        assert first["status"] == "RUNNING", first
        retry_in_airflow(airflow, 2)
        submitted = time.monotonic()
        second = client.post("/jobs", json=body(2)).json()
        assert second["status"] == "RUNNING" and second["job_id"] != first["job_id"], second

        def first_ended() -> bool:
            return str(client.get(f"/jobs/{first['job_id']}").json()["status"]) == "FAILED"

        wait_until(first_ended, timeout=10.0, what="try 1's job ended after try 2 was submitted")
        took = time.monotonic() - submitted
        assert took < SLOW_POLL / 4, f"try 1 stopped {took:.1f} s after try 2's submission: by a poll"
        ended = client.get(f"/jobs/{first['job_id']}").json()
        assert "try" in str(ended["reason"]), ended
        events = client.get(f"/jobs/{first['job_id']}/events").json()["events"]
        assert [e["source"] for e in events if e["new_status"] == "STOPPING"] == ["submit"]
        assert client.get(f"/jobs/{second['job_id']}").json()["status"] == "RUNNING"


def test_a_replayed_older_submission_stops_nothing(tmp_path: Path, airflow: ServedAirflow) -> None:
    """Try 1 submitted again while Airflow still runs try 1 (a retried request): the direct read
    confirms that try 1 is current, and its job keeps running."""
    with slow_polling_sidecar(tmp_path, airflow) as client:
        first = client.post("/jobs", json=body(1, ti_identity="")).json()
        # The same try under another identity would be a re-created run; Airflow says it is not.
        again = client.post("/jobs", json=body(1, ti_identity="0199aaaa")).json()
        assert again["job_id"] != first["job_id"]
        time.sleep(2.0)  # the check runs beside the answer; give it time to (wrongly) act
        assert client.get(f"/jobs/{first['job_id']}").json()["status"] == "RUNNING"
