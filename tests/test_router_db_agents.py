"""Registered agents in the router DB, on SQLite and PostgreSQL: heartbeats, id conflicts, forgetting.

A heartbeat is one upsert: the same agent's heartbeat updates its row, a restarted agent (same URL, new
instance) registers anew, and another live agent claiming the id elsewhere is refused without a change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from router_db import AgentConflict, AgentRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey

T0 = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)
LONG_AGO = T0 - timedelta(days=1)


def agent(agent_id: str = "vm-1", **changes: Any) -> AgentRecord:
    record = AgentRecord(
        agent_id=agent_id,
        url=f"http://{agent_id}.internal:8791",
        labels=("gpu", "large"),
        max_jobs=4,
        jobs_running=1,
        version="1.4.0",
        draining=False,
        instance="instance-a",
        registered_at=T0,
        last_heartbeat_at=T0,
        heartbeat_seconds=10.0,
    )
    return replace(record, **changes)


def test_a_first_heartbeat_registers_the_agent_as_given(router_db: RouterDB) -> None:
    record = agent()
    stored = router_db.heartbeat_agent(record, alive_after=LONG_AGO)
    assert stored == record
    assert router_db.registered_agents() == [record]
    assert stored.registered_at.tzinfo is not None and stored.registered_at.utcoffset() == timedelta(0)


def test_a_heartbeat_of_the_same_instance_updates_every_field_but_keeps_the_registration_time(
    router_db: RouterDB,
) -> None:
    router_db.heartbeat_agent(agent(), alive_after=LONG_AGO)
    later = T0 + timedelta(seconds=10)
    beat = agent(
        url="https://vm-1.moved:8791",  # the same instance may move: it is the same process
        labels=("cpu",),
        max_jobs=0,
        jobs_running=3,
        version="1.4.1",
        draining=True,
        registered_at=later,
        last_heartbeat_at=later,
        heartbeat_seconds=5.0,
    )
    stored = router_db.heartbeat_agent(beat, alive_after=later - timedelta(seconds=120))
    assert stored == replace(beat, registered_at=T0)
    assert router_db.registered_agents() == [stored]


def test_a_restarted_agent_at_the_same_url_registers_anew(router_db: RouterDB) -> None:
    router_db.heartbeat_agent(agent(), alive_after=LONG_AGO)
    later = T0 + timedelta(seconds=3)
    restarted = agent(instance="instance-b", registered_at=later, last_heartbeat_at=later)
    # The old instance heartbeat 3 s ago, well within the liveness window: still allowed, same URL.
    stored = router_db.heartbeat_agent(restarted, alive_after=later - timedelta(seconds=120))
    assert stored == restarted and stored.registered_at == later


def test_another_live_agent_claiming_the_id_elsewhere_is_refused_and_changes_nothing(
    router_db: RouterDB,
) -> None:
    first = router_db.heartbeat_agent(agent(), alive_after=LONG_AGO)
    later = T0 + timedelta(seconds=30)
    impostor = agent(
        url="http://10.0.0.99:8791", instance="instance-z", registered_at=later, last_heartbeat_at=later
    )
    with pytest.raises(AgentConflict) as refused:
        router_db.heartbeat_agent(impostor, alive_after=T0)  # the first heartbeat at T0 is still live
    assert refused.value.existing == first
    assert "http://vm-1.internal:8791" in str(refused.value)
    assert T0.isoformat(timespec="seconds") in str(refused.value)
    assert router_db.registered_agents() == [first]


def test_an_id_whose_agent_fell_silent_may_be_taken_elsewhere(router_db: RouterDB) -> None:
    router_db.heartbeat_agent(agent(), alive_after=LONG_AGO)
    later = T0 + timedelta(minutes=5)
    successor = agent(
        url="http://10.0.0.99:8791", instance="instance-z", registered_at=later, last_heartbeat_at=later
    )
    stored = router_db.heartbeat_agent(successor, alive_after=later - timedelta(seconds=120))
    assert stored == successor
    assert router_db.registered_agents() == [successor]


def test_times_given_in_another_zone_are_stored_as_utc_and_compared_as_such(router_db: RouterDB) -> None:
    elsewhere = timezone(timedelta(hours=-5))
    stored = router_db.heartbeat_agent(
        agent(registered_at=T0.astimezone(elsewhere), last_heartbeat_at=T0.astimezone(elsewhere)),
        alive_after=LONG_AGO,
    )
    assert stored.last_heartbeat_at == T0 and stored.last_heartbeat_at.utcoffset() == timedelta(0)
    # One second after the heartbeat, in yet another zone: the agent is no longer live by that bound.
    after = (T0 + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=9)))
    taken = router_db.heartbeat_agent(agent(url="http://other:1", instance="instance-z"), alive_after=after)
    assert taken.url == "http://other:1"


def test_registered_agents_come_in_id_order(router_db: RouterDB) -> None:
    for agent_id in ("vm-3", "vm-1", "vm-2"):
        router_db.heartbeat_agent(agent(agent_id), alive_after=LONG_AGO)
    assert [a.agent_id for a in router_db.registered_agents()] == ["vm-1", "vm-2", "vm-3"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"agent_id": "vm\x00-1"}, "agent_id"),
        ({"url": "http://vm/\x00"}, "url"),
        ({"url": "http://vm/" + "a" * 2000}, "url"),
        ({"agent_id": "a" * 201}, "agent_id"),
        ({"instance": "i" * 65}, "instance"),
        ({"version": "v" * 101}, "version"),
        ({"instance": ""}, "instance"),
        ({"labels": ("gpu", "nul\x00")}, "labels"),
        ({"max_jobs": -1}, "max_jobs"),
        ({"jobs_running": 2**31}, "jobs_running"),
        ({"max_jobs": True}, "max_jobs"),
        ({"heartbeat_seconds": 0.0}, "heartbeat_seconds"),
        ({"heartbeat_seconds": float("nan")}, "heartbeat_seconds"),
        ({"last_heartbeat_at": datetime(2026, 12, 5, 12, 0)}, "last_heartbeat_at"),  # naive
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else value,
)
def test_a_record_the_database_cannot_store_is_refused_before_writing(
    router_db: RouterDB, change: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named) as refused:
        router_db.heartbeat_agent(agent(**change), alive_after=LONG_AGO)
    assert "\x00" not in str(refused.value) and "aaaa" not in str(refused.value)  # names, never values
    assert router_db.registered_agents() == []


def test_a_naive_liveness_bound_is_refused(router_db: RouterDB) -> None:
    with pytest.raises(ValueError, match="UTC-aware"):
        router_db.heartbeat_agent(agent(), alive_after=datetime(2026, 1, 1))
    assert router_db.registered_agents() == []


def job_on(db: RouterDB, agent_id: str, name: str, *steps: Callable[[RouterDB, str], object]) -> None:
    """A job on ``agent_id``, moved through ``steps`` from QUEUED."""
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id=name, run_id="r"), agent_id, "sleep 1"))
    for step in steps:
        step(db, job.job_id)


def running(db: RouterDB, job_id: str) -> object:
    return db.mark_running(job_id, source="test")


def stopping(db: RouterDB, job_id: str) -> object:
    return db.request_stop(job_id, stop_status=JobStatus.FAILED, reason="test", source="test")


def finished(db: RouterDB, job_id: str) -> object:
    return db.finish(job_id, status=JobStatus.SUCCEEDED, rc=0, reason=None, source="test")


def test_forgetting_removes_silent_agents_without_active_jobs_only(router_db: RouterDB) -> None:
    silent = T0 - timedelta(hours=2)
    for agent_id in ("idle", "queued", "running", "stopping", "done"):
        router_db.heartbeat_agent(agent(agent_id, last_heartbeat_at=silent), alive_after=LONG_AGO)
    router_db.heartbeat_agent(agent("fresh", last_heartbeat_at=T0), alive_after=LONG_AGO)
    job_on(router_db, "queued", "a")
    job_on(router_db, "running", "b", running)
    job_on(router_db, "stopping", "c", running, stopping)
    job_on(router_db, "done", "d", running, finished)
    job_on(router_db, "fresh", "e")
    assert router_db.forget_agents(silent_before=T0 - timedelta(hours=1)) == ["done", "idle"]
    left = [a.agent_id for a in router_db.registered_agents()]
    assert left == ["fresh", "queued", "running", "stopping"]
    assert router_db.forget_agents(silent_before=T0 - timedelta(hours=1)) == []
    # A job's agent that is forgotten keeps its jobs: only the agents table is touched.
    assert len(router_db.search(agent_id="done")) == 1


def at_once(replicas: list[RouterDB], claims: list[AgentRecord]) -> list[object]:
    """Each replica sends its claim at the same moment (a barrier); what each got back or raised."""
    start = threading.Barrier(len(replicas))
    outcomes: list[object] = [None] * len(replicas)

    def register(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = replicas[i].heartbeat_agent(claims[i], alive_after=LONG_AGO)
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_two_replicas_registering_one_id_at_once_leave_exactly_one_holder(router_db: RouterDB) -> None:
    """Each round, two replicas (two engines) register one new id for two different agents at the same
    moment: the database decides, one is stored and the other refused, never an IntegrityError."""
    replicas = [RouterDB(router_db.engine.url.render_as_string(hide_password=False)) for _ in range(2)]
    try:
        for round_ in range(15):
            agent_id = f"race-{round_}"
            claims = [
                agent(agent_id, url=f"http://claimant-{i}:8791", instance=f"instance-{i}") for i in range(2)
            ]
            outcomes = at_once(replicas, claims)
            stored = [o for o in outcomes if isinstance(o, AgentRecord)]
            refused = [o for o in outcomes if isinstance(o, AgentConflict)]
            assert (len(stored), len(refused)) == (1, 1), outcomes
            assert refused[0].existing == stored[0]
            assert [a for a in router_db.registered_agents() if a.agent_id == agent_id] == stored
    finally:
        for replica in replicas:
            replica.dispose()


def test_the_same_agent_heartbeating_through_two_replicas_at_once_is_stored_once(router_db: RouterDB) -> None:
    replicas = [RouterDB(router_db.engine.url.render_as_string(hide_password=False)) for _ in range(2)]
    errors: list[Exception] = []
    start = threading.Barrier(2)

    def beat(i: int) -> None:
        start.wait()
        for n in range(20):
            moment = T0 + timedelta(seconds=n)
            try:
                replicas[i].heartbeat_agent(
                    agent(jobs_running=n, registered_at=moment, last_heartbeat_at=moment),
                    alive_after=LONG_AGO,
                )
            except Exception as exc:
                errors.append(exc)

    try:
        threads = [threading.Thread(target=beat, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        (stored,) = router_db.registered_agents()
        assert stored.registered_at == T0  # the first registration's, kept by every later heartbeat
        assert stored.jobs_running == 19
    finally:
        for replica in replicas:
            replica.dispose()


def test_a_silent_holder_with_active_jobs_keeps_its_id_until_they_end(router_db: RouterDB) -> None:
    """Its jobs would be addressed to the newcomer, which knows none of them: a stop there would find
    nothing while the job ran on. Once they ended (the lost rule fails them), the id is free."""
    router_db.heartbeat_agent(agent(), alive_after=LONG_AGO)
    job_on(router_db, "vm-1", "held", running)
    later = T0 + timedelta(minutes=5)
    newcomer = agent(url="http://10.0.0.99:8791", instance="instance-z", last_heartbeat_at=later)
    with pytest.raises(AgentConflict):
        router_db.heartbeat_agent(newcomer, alive_after=later - timedelta(seconds=120))
    assert [a.url for a in router_db.registered_agents()] == [agent().url]
    (held,) = router_db.active(agent_id="vm-1")
    router_db.finish(held.job_id, status=JobStatus.FAILED, rc=None, reason="agent vm-1 lost", source="fleet")
    assert router_db.heartbeat_agent(newcomer, alive_after=later - timedelta(seconds=120)).url == newcomer.url


def test_an_agent_that_leaves_goes_unless_it_still_has_an_active_job(router_db: RouterDB) -> None:
    router_db.heartbeat_agent(agent("idle"), alive_after=LONG_AGO)
    router_db.heartbeat_agent(agent("busy"), alive_after=LONG_AGO)
    job_on(router_db, "busy", "kept", running)
    assert not router_db.leave_agent("idle", "another-instance")  # only the process that registered
    assert router_db.leave_agent("idle", agent("idle").instance)
    assert not router_db.leave_agent("busy", agent("busy").instance)
    assert [a.agent_id for a in router_db.registered_agents()] == ["busy"]
