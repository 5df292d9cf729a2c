"""``GET /readyz`` of the sidecar, judged from what the replica observed."""

from __future__ import annotations

import pytest

from reconciler.api.readiness import assess

pytestmark = pytest.mark.fast

FINE = {
    "leader": True,
    "db_error": None,
    "since_last_cycle": 1.0,
    "ready_after": 10.0,
    "full_read_error": None,
    "agent_states": {"vm-1": "live"},
}


def test_a_leader_with_a_recent_cycle_is_ready() -> None:
    assert assess(**FINE).to_json() == {"status": "ready", "role": "leader"}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"db_error": "OperationalError"}, "router DB unreachable: OperationalError"),
        ({"since_last_cycle": None}, "no successful reconcile cycle recently"),
        ({"since_last_cycle": 10.5}, "no successful reconcile cycle recently"),
    ],
)
def test_a_leader_is_not_ready_without_its_db_or_its_cycles(changes: dict[str, object], problem: str) -> None:
    readiness = assess(**{**FINE, **changes})  # type: ignore[arg-type]
    assert not readiness.ready and readiness.to_json()["status"] == "not ready"
    assert any(p.startswith(problem) for p in readiness.problems)


def test_a_standby_needs_only_its_db() -> None:
    standby = {**FINE, "leader": False, "since_last_cycle": None, "full_read_error": "HTTP 500"}
    assert assess(**standby).to_json() == {"status": "ready", "role": "standby"}  # type: ignore[arg-type]
    assert not assess(**{**standby, "db_error": "OperationalError"}).ready  # type: ignore[arg-type]


def test_troubles_that_leave_the_leader_ready_are_warnings() -> None:
    readiness = assess(
        **{**FINE, "full_read_error": "HTTP 500", "agent_states": {"vm-1": "lost", "vm-2": "suspect"}}  # type: ignore[arg-type]
    )
    assert readiness.to_json() == {
        "status": "ready",
        "role": "leader",
        "warnings": ["full read of task instances failing: HTTP 500", "agents lost: vm-1"],
    }
