"""Agents' credentials in the router DB, on SQLite and PostgreSQL: a heartbeat made with a credential
updates only the row that holds it, never inserts one; a renewal is taken once, and taken again as
held when its answer was lost; an expired or revoked credential changes nothing; a revoked id takes
no bootstrap either, until it is forgotten; and the periodic forgetting leaves revoked rows alone.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from router_db import AgentConflict, AgentRecord, JobStatus, NewJob, NotRegistered, RouterDB, TaskInstanceKey

OLD, NEW, OTHER = "a" * 64, "b" * 64, "c" * 64


def record(db: RouterDB, **changes: Any) -> AgentRecord:
    now = db.now()
    base = AgentRecord(
        agent_id="vm-1",
        url="http://vm-1.internal:8791",
        labels=("pool",),
        max_jobs=2,
        jobs_running=0,
        version="2.0",
        draining=False,
        instance="i-1",
        registered_at=now,
        last_heartbeat_at=now,
        identity_fingerprint=OLD,
        call_token="1" * 64,
    )
    return replace(base, **changes)


def bootstrap(db: RouterDB, **changes: Any) -> AgentRecord:
    return db.heartbeat_agent_now(record(db, **changes), alive_within=60)


def test_a_credential_updates_only_the_row_that_holds_it_and_never_inserts(router_db: RouterDB) -> None:
    with pytest.raises(NotRegistered) as nothing:
        router_db.beat_agent_with_credential(record(router_db), proven=OLD, lifetime=0)
    assert nothing.value.held is None and router_db.registered_agents() == []

    first = bootstrap(router_db)
    assert first.credential_issued_at is not None and first.call_token == "1" * 64
    beat = router_db.beat_agent_with_credential(record(router_db, jobs_running=2), proven=OLD, lifetime=0)
    assert (beat.jobs_running, beat.credential_issued_at, beat.registered_at) == (
        2,
        first.credential_issued_at,
        first.registered_at,
    )
    # A restart at the row's URL with the credential: a new instance, registered anew.
    restarted = router_db.beat_agent_with_credential(
        record(router_db, instance="i-2"), proven=OLD, lifetime=0
    )
    assert restarted.instance == "i-2" and restarted.registered_at >= first.registered_at
    for wrong in (
        {"proven": OTHER},  # another credential
        {"proven": ""},
    ):
        with pytest.raises(NotRegistered) as refused:
            router_db.beat_agent_with_credential(
                record(router_db, identity_fingerprint=OTHER), lifetime=0, **wrong
            )
        assert refused.value.held is not None and refused.value.held.identity_fingerprint == OLD
    # Its own credential at another URL, as another process or as the same one (its instance is
    # public), without a judged move: refused.
    elsewhere = record(router_db, url="http://elsewhere:1", instance="i-3")
    for replayed in (elsewhere, replace(elsewhere, instance="i-2")):
        with pytest.raises(NotRegistered):
            router_db.beat_agent_with_credential(replayed, proven=OLD, lifetime=0)
    moved = router_db.beat_agent_with_credential(
        elsewhere, proven=OLD, lifetime=0, moving_from=("http://vm-1.internal:8791", "i-2")
    )
    assert (moved.url, moved.instance) == ("http://elsewhere:1", "i-3")


def test_a_renewal_is_taken_once_and_a_lost_answer_is_no_lock_out(router_db: RouterDB) -> None:
    bootstrap(router_db)
    renewing = record(router_db, identity_fingerprint=NEW, call_token="2" * 64)
    renewed = router_db.beat_agent_with_credential(renewing, proven=OLD, lifetime=0)
    assert (renewed.identity_fingerprint, renewed.previous_fingerprint, renewed.call_token) == (
        NEW,
        OLD,
        "2" * 64,
    )
    # The answer was lost: the agent sends the same again, still presenting the old credential.
    again = router_db.beat_agent_with_credential(renewing, proven=OLD, lifetime=0)
    assert (again.identity_fingerprint, again.previous_fingerprint) == (NEW, OLD)
    assert again.credential_issued_at == renewed.credential_issued_at
    # The new credential speaks; the old one alone no longer does.
    router_db.beat_agent_with_credential(record(router_db, identity_fingerprint=NEW), proven=NEW, lifetime=0)
    with pytest.raises(NotRegistered):
        router_db.beat_agent_with_credential(
            record(router_db, identity_fingerprint=OLD), proven=OLD, lifetime=0
        )


def test_an_expired_credential_changes_nothing_and_a_bootstrap_keeps_its_age(router_db: RouterDB) -> None:
    first = bootstrap(router_db)
    assert first.credential_issued_at is not None
    with pytest.raises(NotRegistered):  # a lifetime already over
        router_db.beat_agent_with_credential(record(router_db), proven=OLD, lifetime=1e-6)
    assert router_db.registered_agent("vm-1") == first
    again = bootstrap(router_db, instance="i-2")  # a restart with the fleet token: no younger
    assert again.credential_issued_at == first.credential_issued_at
    renewed = router_db.beat_agent_with_credential(
        record(router_db, instance="i-2", identity_fingerprint=NEW), proven=OLD, lifetime=0
    )  # a renewal the fleet token vouches for (no lifetime): a new secret, issued now
    assert (
        renewed.credential_issued_at is not None
        and renewed.credential_issued_at >= first.credential_issued_at
    )
    assert renewed.identity_fingerprint == NEW


def test_a_revoked_id_takes_nothing_until_it_is_forgotten(router_db: RouterDB) -> None:
    bootstrap(router_db)
    job, _ = router_db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "vm-1", "sleep 1"))
    revoked = router_db.revoke_agent("vm-1")
    assert revoked is not None and revoked.revoked_at is not None
    again = router_db.revoke_agent("vm-1")
    assert again is not None and again.revoked_at == revoked.revoked_at  # the first time stays
    assert router_db.revoke_agent("nobody") is None
    with pytest.raises(NotRegistered):
        router_db.beat_agent_with_credential(record(router_db), proven=OLD, lifetime=0)
    # No bootstrap either: not its own process, not another identity, however long silent.
    for claim in ({}, {"identity_fingerprint": OTHER, "instance": "i-9", "url": "http://x:1"}):
        with pytest.raises(AgentConflict):
            router_db.heartbeat_agent_now(record(router_db, **claim), alive_within=0)
    # The periodic forgetting leaves it; forgetting it by hand waits for its jobs to end.
    assert router_db.forget_agents(silent_before=router_db.now() + timedelta(days=1)) == []
    assert not router_db.forget_agent("vm-1", alive_within=60)
    router_db.mark_running(job.job_id, source="test")
    router_db.finish(job.job_id, status=JobStatus.FAILED, rc=None, reason="lost", source="test")
    assert router_db.forget_agent("vm-1", alive_within=60)
    assert router_db.registered_agent("vm-1") is None
    assert bootstrap(router_db).revoked_at is None  # registers again


def test_forgetting_by_hand_takes_a_lost_idle_agent_but_not_a_live_one(router_db: RouterDB) -> None:
    bootstrap(router_db)
    assert not router_db.forget_agent("vm-1", alive_within=60)  # heard just now
    assert router_db.forget_agent("vm-1", alive_within=0)
    assert not router_db.forget_agent("vm-1", alive_within=0)  # gone already
