"""Whether this sidecar replica is ready (``GET /readyz``): a pure judgement of what it observed.

A standby runs no cycles: it is ready when it can serve the API, i.e. reach the router DB. The leader
must also have finished a cycle recently. Some troubles leave it ready (the API serves, the
incremental reads run) but must be seen by people: they are warnings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.fleet.agent_state import AgentState


@dataclass(frozen=True)
class Readiness:
    role: str  # "leader" or "standby"
    problems: list[str] = field(default_factory=list)  # any: not ready (503)
    warnings: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        answer: dict[str, object] = {"status": "ready" if self.ready else "not ready", "role": self.role}
        if self.problems:
            answer["problems"] = self.problems
        elif self.warnings:
            answer["warnings"] = self.warnings
        return answer


def assess(
    *,
    leader: bool,
    db_error: str | None,
    since_last_cycle: float | None,
    ready_after: float,
    full_read_error: str | None,
    agent_states: Mapping[str, str],
) -> Readiness:
    """``since_last_cycle``: seconds since the last successful cycle (None: none yet)."""
    role = "leader" if leader else "standby"
    problems = []
    if db_error is not None:
        problems.append(f"router DB unreachable: {db_error}")
    if leader and (since_last_cycle is None or since_last_cycle > ready_after):
        problems.append("no successful reconcile cycle recently (Airflow reachable?)")
    warnings = []
    if leader and full_read_error is not None:
        warnings.append(f"full read of task instances failing: {full_read_error}")
    lost = [agent for agent, state in agent_states.items() if state == AgentState.LOST]
    if leader and lost:
        warnings.append(f"agents lost: {', '.join(lost)}")
    wrong = [agent for agent, state in agent_states.items() if state == AgentState.WRONG_IDENTITY]
    if leader and wrong:
        warnings.append(f"agents whose URL another agent answers (nothing is sent there): {', '.join(wrong)}")
    return Readiness(role, problems, warnings)
