"""The sidecar checks that the agent at a URL is the agent it has configured there.

Real processes: the sidecar's ``agent-1`` has a job running when its address comes to be served by
another agent, ``vm-other`` (a VM replaced, an address reused, a DNS name moved), which accepts the
same token. A stop sent there would be answered "no such job", and the job recorded as ended while
it keeps running on the real VM; a new job would run on the wrong VM. Nothing may be sent there, the
mismatch must be visible, and the real agent's jobs must not be lost for it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from harness.agent import AgentProcess
from harness.processes import free_port, wait_until
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from reconciler.api.readiness import assess
from reconciler.fleet.agent_state import AgentState, agent_state, identity_problem

FLEET = "[fleet]\nlost_after_seconds = 60.0\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"


def submission(task: str, **route: object) -> dict[str, object]:
    return {
        "command": "sleep 600",
        "dag_id": "ident",
        "task_id": task,
        "run_id": "r",
        "try_number": 1,
        **route,
    }


def wrong_identity_count(sidecar: SidecarProcess) -> float:
    text = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    found = re.search(r'^reconciler_agents\{state="wrong_identity"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_an_agent_answering_as_another_gets_no_stop_and_no_job_and_its_jobs_are_not_lost(
    tmp_path: Path,
) -> None:
    airflow = ServedAirflow()
    for task in ("pinned", "pinned-new", *(f"any-{i}" for i in range(4))):
        airflow.standin.add("ident", "r", task, -1, state="deferred", try_number=1)
    airflow.start()
    port = free_port()
    first = AgentProcess(tmp_path / "vm-1", agent_id="agent-1", port=port).start()
    impostor: AgentProcess | None = None
    pid = 0  # the job's shell, leader of its process group
    try:
        with (
            AgentProcess(tmp_path / "vm-2", agent_id="agent-2") as second,
            SidecarProcess(
                workdir=tmp_path / "sidecar",
                airflow_url=airflow.url,
                airflow_password="unused",
                agents=[
                    AgentRef("agent-1", first.url, first.token, labels=["default"]),
                    AgentRef("agent-2", second.url, second.token, labels=["default"]),
                ],
                api_version="v2",
                interval_seconds=0.5,
                extra_config=FLEET,
            ) as sidecar,
            sidecar.client() as client,
        ):
            job = client.post("/jobs", json=submission("pinned", agent_id="agent-1")).json()
            assert job["status"] == "RUNNING", job
            with httpx.Client(headers={"X-Agent-Token": first.token}, timeout=5) as direct:
                pid = int(direct.get(f"{first.url}/jobs/{job['job_id']}").json()["pid"])
            first.terminate()  # its job keeps running, as through an agent restart
            impostor = AgentProcess(tmp_path / "vm-other", agent_id="vm-other", port=port).start()
            wait_until(lambda: wrong_identity_count(sidecar) == 1, timeout=10, what="the mismatch seen")
            mismatch_seen = time.monotonic()

            # Airflow says stop; the stop waits for the real agent, and nothing reaches the other one.
            airflow.mark(("ident", "r", "pinned", -1), "failed")
            wait_until(
                lambda: client.get(f"/jobs/{job['job_id']}").json()["status"] == "STOPPING",
                timeout=10,
                what="the stop intent recorded",
            )
            routed = [client.post("/jobs", json=submission(f"any-{i}", labels=["default"])) for i in range(4)]
            pinned = client.post("/jobs", json=submission("pinned-new", agent_id="agent-1"))
            time.sleep(2.0)  # four cycles: time for a stop or a sync to (wrongly) reach the other agent
            assert client.get(f"/jobs/{job['job_id']}").json()["status"] == "STOPPING"
            assert psutil.pid_exists(pid), "the job on the real VM must still run"
            impostor_log = impostor.log_text()
            assert "/stop/" not in impostor_log and "/run" not in impostor_log and "/jobs" not in impostor_log
            assert [r.status_code for r in routed] == [201] * 4
            assert {r.json()["agent_id"] for r in routed} == {"agent-2"}
            assert pinned.status_code == 503 and int(pinned.headers["Retry-After"]) > 0
            assert all(word in pinned.json()["error"] for word in ("'vm-other'", "'agent-1'", first.url))
            warnings = client.get("/readyz").json().get("warnings", [])
            assert any("agent-1" in w and "another agent" in w for w in warnings), warnings
            errors = [
                line
                for line in sidecar.log_path.read_text().splitlines()
                if '"action": "agent_wrong_identity"' in line
            ]
            assert len(errors) == 1 and '"level": "error"' in errors[0]
            assert all(word in errors[0] for word in ("agent-1", "'vm-other'", first.url)), errors

            # The real agent back at its address: the pending stop goes through, to it.
            impostor.stop()
            impostor = None
            restarted = AgentProcess(tmp_path / "vm-1", agent_id="agent-1", port=port).start()
            try:
                wait_until(
                    lambda: client.get(f"/jobs/{job['job_id']}").json()["status"] == "FAILED",
                    timeout=15,
                    what="the stop carried out by the real agent",
                )
                wait_until(lambda: not psutil.pid_exists(pid), timeout=5, what="the job's process gone")
                pid = 0  # gone: nothing of it to clean up (and its number may be reused)
                # The gauge follows at the fleet's next tick (the stop may go through just before it).
                wait_until(lambda: wrong_identity_count(sidecar) == 0, timeout=5, what="the gauge cleared")
            finally:
                restarted.stop()
            ended = client.get(f"/jobs/{job['job_id']}").json()
            assert "lost" not in str(ended["reason"]) and ended["rc"] is not None, ended
            assert time.monotonic() - mismatch_seen < 60, "the test outran lost_after_seconds"
    finally:
        if impostor is not None:
            impostor.stop()
        first.stop()
        if pid:  # the job outlived its agent: do not leave it behind when the test fails early
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        airflow.stop()


@pytest.mark.fast
def test_a_health_answer_naming_another_agent_is_a_wrong_identity_not_contact() -> None:
    url = "http://10.0.0.5:8791"
    assert identity_problem({"status": "ok", "agent_id": "agent-1"}, expected="agent-1", url=url) is None
    problem = identity_problem({"status": "ok", "agent_id": "vm-other"}, expected="agent-1", url=url)
    assert problem == "the agent at http://10.0.0.5:8791 says it is 'vm-other', not 'agent-1'"
    assert "gives no agent_id" in str(identity_problem({"status": "ok"}, expected="agent-1", url=url))
    assert "gives no agent_id" in str(identity_problem({"agent_id": 7}, expected="agent-1", url=url))
    # Shown as such until the configured agent has been silent for lost_after: then lost, not sooner.
    shown = {"last_contact": 0.0, "last_check_ok": False, "lost_after": 120.0, "wrong_identity": True}
    assert agent_state(failed_check_started=119.0, **shown) is AgentState.WRONG_IDENTITY  # type: ignore[arg-type]
    assert agent_state(failed_check_started=120.0, **shown) is AgentState.LOST  # type: ignore[arg-type]
    readiness = assess(
        leader=True,
        db_error=None,
        since_last_cycle=1.0,
        ready_after=10.0,
        full_read_error=None,
        agent_states={"agent-1": "wrong_identity", "agent-2": "live"},
    )
    assert readiness.ready and readiness.warnings == [
        "agents whose URL another agent answers (nothing is sent there): agent-1"
    ]
