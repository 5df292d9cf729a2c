"""The sidecar's side of fencing: a fenced job of a lost agent ends FAILED only once its fence has
surely stopped it, so Airflow's retry elsewhere never overlaps it.

An agent stops its ``at_most_once`` jobs once cut off from the sidecar for its fence terms
(:mod:`agent_api.fencing`); they are gone ``terms.gone_after()`` seconds after its last contact. The
sidecar's record of that contact is later than the agent's by at most one heartbeat (a registered
agent counts a heartbeat from its sending, and one whose answer was lost not at all) or one health
check and its timeout (an ``[[agents]]`` agent counts any call: the catch-up reads made while its
checks answer). So a fenced job may end ``gone_after() + margin`` seconds after the sidecar last heard
from the agent.

Two rules follow. An agent whose fence would still be running when the sidecar declares it lost
(``lost_after_seconds``) takes no job it would fence, and the log and the submission's refusal name
the keys on both sides (:func:`fence_problem`). It still registers: refusing it would keep its old
terms in the router DB and turn a config edit into an outage. And the lost rule itself waits
(:func:`fence_wait`): settings changed since (a sidecar restarted with a shorter
``lost_after_seconds``, an ``[[agents]]`` agent, which cannot be refused) never let a fenced job end
before its fence did. Silence is counted as the lost rule counts it, only from when
this sidecar listened: a replica that just took over waits longer, never shorter.
"""

from __future__ import annotations

from agent_api.fencing import FenceTerms, check_period


def fence_problem(
    terms: FenceTerms, *, agent_id: str, heartbeat_seconds: float, lost_after: float
) -> str | None:
    """Why a registered agent with these terms could still run a fenced job when it is declared lost
    (None: it cannot)."""
    if not terms.fences:
        return None
    needed = terms.gone_after() + heartbeat_seconds
    if needed < lost_after:
        return None
    return (
        f"agent {agent_id} fences too late for this sidecar: its [agent] fence_after_seconds "
        f"{terms.after_seconds:g} + one fence check {check_period(terms.after_seconds):g} s + [agent] "
        f"grace_seconds {terms.grace_seconds:g} + one heartbeat {heartbeat_seconds:g} s = {needed:g} s must "
        f"be under the sidecar's [fleet] lost_after_seconds {lost_after:g}, or a retry elsewhere could "
        "overlap a job still running there: lower the agent's fence_after_seconds or grace_seconds, or "
        "raise lost_after_seconds"
    )


def fence_wait(gone_after: float, *, silent_for: float, margin: float) -> float:
    """Seconds until a fenced job, surely ended ``gone_after`` seconds after its agent's last contact, has
    ended, the agent having been silent for ``silent_for`` (0: it has)."""
    return max(0.0, gone_after + margin - silent_for)
