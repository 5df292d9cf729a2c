"""Three sidecar replicas on one PostgreSQL router DB, as real processes: one leader, fail-over."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx

from harness.agent import AgentProcess
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess

LEASE_SECONDS = 3.0
_LEADER = re.compile(r"^reconciler_leader ([0-9.]+)$", re.MULTILINE)


def leader_gauge(sidecar: SidecarProcess) -> float | None:
    try:
        text = httpx.get(f"{sidecar.url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    found = _LEADER.search(text)
    return float(found.group(1)) if found else None


def leaders(replicas: list[SidecarProcess]) -> list[SidecarProcess]:
    return [r for r in replicas if r.proc is not None and leader_gauge(r) == 1.0]


def wait_for_one_leader(replicas: list[SidecarProcess], timeout: float) -> tuple[SidecarProcess, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        found = leaders(replicas)
        if len(found) == 1:
            return found[0], time.monotonic() - started
        assert len(found) <= 1, "two replicas report leader 1"
        time.sleep(0.1)
    raise AssertionError(f"no leader within {timeout} s")


def submit(replica: SidecarProcess, n: int) -> str:
    body = {
        "command": "sleep 30",
        "agent_id": "agent-1",
        "dag_id": "d",
        "task_id": f"t{n}",
        "run_id": "r",
        "try_number": 1,
    }
    with replica.client() as client:
        answer = client.post("/jobs", json=body)
    assert answer.status_code in (200, 201), answer.text
    return str(answer.json()["job_id"])


def test_three_replicas_elect_one_leader_a_standby_takes_over_after_sigkill_and_sigterm_hands_over(
    tmp_path: Path, postgres_url: str
) -> None:
    with AgentProcess(tmp_path / "agent", agent_id="agent-1", token="a-token") as agent:
        replicas = [
            SidecarProcess(
                workdir=tmp_path / f"sidecar-{i}",
                airflow_url=f"http://127.0.0.1:{free_port()}",  # unreachable: the loop keeps every job
                airflow_password="unused",
                agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
                db_url=postgres_url,
                interval_seconds=0.2,
                lease_seconds=LEASE_SECONDS,
            )
            for i in range(3)
        ]
        try:
            for replica in replicas:
                replica.start()
            leader, _ = wait_for_one_leader(replicas, timeout=LEASE_SECONDS + 5)
            time.sleep(LEASE_SECONDS)  # several renewals later, still exactly one
            assert leaders(replicas) == [leader]
            for n, replica in enumerate(replicas):  # every replica serves the API
                assert httpx.get(f"{replica.url}/healthz", timeout=5).status_code == 200
                submit(replica, n)
            # Airflow is unreachable here: the leader is not ready, standbys are (their API works).
            for replica in replicas:
                ready = httpx.get(f"{replica.url}/readyz", timeout=5)
                role = "leader" if replica is leader else "standby"
                assert (ready.status_code, ready.json()["role"]) == (
                    (503, role) if role == "leader" else (200, role)
                )

            assert leader.proc is not None
            leader.proc.kill()  # SIGKILL to that one PID: no chance to release the lease
            killed = time.monotonic()
            leader.proc.wait(timeout=10)
            leader.proc = None
            standbys = [r for r in replicas if r is not leader]
            n = 10
            new_leader = None
            while time.monotonic() - killed < LEASE_SECONDS + 5:
                for replica in standbys:  # the API keeps answering during the fail-over
                    assert httpx.get(f"{replica.url}/healthz", timeout=5).status_code == 200
                    submit(replica, n)
                    n += 1
                found = leaders(standbys)
                assert len(found) <= 1
                if found:
                    new_leader = found[0]
                    break
                time.sleep(0.25)
            took = time.monotonic() - killed
            assert new_leader is not None, "no standby took over"
            # The lease expires at most LEASE_SECONDS after the kill; a standby asks every second; and
            # this loop sees it only after a pass of its own requests (slow on a busy machine).
            assert took <= LEASE_SECONDS + 3.0, took
            time.sleep(1.0)
            assert leaders(standbys) == [new_leader]

            # A graceful shutdown releases the lease: the last replica leads well before it would expire.
            assert new_leader.proc is not None
            new_leader.proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            assert new_leader.proc.wait(timeout=40) == 0
            new_leader.proc = None
            (last,) = [r for r in standbys if r is not new_leader]
            wait_for_one_leader([last], timeout=LEASE_SECONDS + 5)
            assert time.monotonic() - stopped < LEASE_SECONDS, "the lease was not released on SIGTERM"
        finally:
            for replica in replicas:
                replica.stop()
