"""A registered agent's heartbeat written straight into the router DB, as the registry writes it (the
router DB's own time), for tests that drive the fleet's bookkeeping without agent processes."""

from __future__ import annotations

from harness.processes import free_port
from router_db import AgentRecord, RouterDB


def beat(
    db: RouterDB, agent_id: str, *, url: str | None = None, instance: str = "one", draining: bool = False
) -> None:
    """One heartbeat of ``agent_id`` every 0.5 s; ``url`` defaults to a port nobody listens on (the
    orphan sweep then only fails)."""
    now = db.now()
    record = AgentRecord(
        agent_id=agent_id,
        url=url or f"http://127.0.0.1:{free_port()}",
        labels=(),
        max_jobs=0,
        jobs_running=0,
        version="",
        draining=draining,
        instance=instance,
        registered_at=now,
        last_heartbeat_at=now,
        heartbeat_seconds=0.5,
    )
    db.heartbeat_agent(record, alive_after=now)
