"""One leader among replicas: the lease's compare-and-set, and the loop run only while it is held."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from reconciler.config import LeaderConfig
from reconciler.core.leadership import Leadership, holder_id
from reconciler.metrics import Metrics
from router_db import RouterDB


def race(db: RouterDB, name: str, holders: list[str]) -> dict[str, bool]:
    """Every holder asks for the free lease at the same moment, each from its own thread."""
    start = threading.Barrier(len(holders))
    won: dict[str, bool] = {}

    def campaign(holder: str) -> None:
        start.wait()
        won[holder] = db.acquire_lease(name, holder, 30)

    threads = [threading.Thread(target=campaign, args=(h,)) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_two_holders_racing_for_a_free_lease_exactly_one_wins(router_db: RouterDB) -> None:
    for round_ in range(10):
        won = race(router_db, f"race-{round_}", ["a", "b"])
        assert sorted(won.values()) == [False, True], won
        winner = next(h for h, ok in won.items() if ok)
        assert router_db.lease_holder(f"race-{round_}") == winner


def test_a_held_lease_is_renewed_only_by_its_holder_and_passes_on_expiry(router_db: RouterDB) -> None:
    assert router_db.acquire_lease("l", "a", 1)
    assert not router_db.acquire_lease("l", "b", 1)
    assert router_db.acquire_lease("l", "a", 1)  # renewal
    time.sleep(1.3)
    assert router_db.lease_holder("l") is None  # expired by the database's clock
    assert router_db.acquire_lease("l", "b", 1)
    assert not router_db.acquire_lease("l", "a", 1)  # the old holder cannot renew after losing it
    assert router_db.lease_holder("l") == "b"


def test_a_released_lease_is_free_at_once_and_only_its_holder_can_release(router_db: RouterDB) -> None:
    assert router_db.acquire_lease("l", "a", 60)
    assert not router_db.release_lease("l", "b")
    assert router_db.lease_holder("l") == "a"
    assert router_db.release_lease("l", "a")
    assert router_db.acquire_lease("l", "b", 60)


@pytest.mark.fast
def test_holder_ids_name_the_host_and_process_and_differ() -> None:
    first, second = holder_id(), holder_id()
    assert first != second and first.count(":") == 2


class CountingTerm:
    """A stand-in for the poll loop: counts terms and how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.terms = 0
        self.cancelled = 0

    async def __call__(self, over: asyncio.Event) -> None:
        self.running += 1
        self.terms += 1
        self.most = max(self.most, self.running)
        try:
            await over.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


@pytest.mark.fast
def test_graceful_shutdown_hands_the_lease_to_a_standby_at_once(db: RouterDB) -> None:
    async def scenario() -> float:
        config = LeaderConfig(lease_seconds=30)  # far longer than the handover may take
        term = CountingTerm()
        first = Leadership(db=db, metrics=Metrics(), config=config)
        second = Leadership(db=db, metrics=Metrics(), config=config)
        stop_first, stop_second = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(first.run(stop_first, term))
        await asyncio.sleep(0.3)
        b = asyncio.create_task(second.run(stop_second, term))
        await asyncio.sleep(1.5)
        assert first.is_leader and not second.is_leader and term.running == 1
        stop_first.set()
        await a
        await first.release()
        released = time.monotonic()
        while not second.is_leader:
            await asyncio.sleep(0.05)
        took = time.monotonic() - released
        stop_second.set()
        await b
        assert term.most == 1 and term.terms == 2
        return took

    assert asyncio.run(scenario()) < 2.0


@pytest.mark.fast
def test_a_leader_whose_lease_was_taken_stops_its_loop_at_once(db: RouterDB) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        term = CountingTerm()
        leader = Leadership(db=db, metrics=metrics, config=LeaderConfig(lease_seconds=3))
        stopping = asyncio.Event()
        task = asyncio.create_task(leader.run(stopping, term))
        await asyncio.sleep(0.5)
        assert leader.is_leader and metrics.leader._value.get() == 1
        # Another replica takes the lease (as after a long pause of this one): expire it, then win it.
        await asyncio.to_thread(db.release_lease, "reconciler", leader.holder)
        assert await asyncio.to_thread(db.acquire_lease, "reconciler", "usurper", 60)
        for _ in range(40):  # the next renewal (a third of the lease) finds out
            await asyncio.sleep(0.1)
            if not leader.is_leader:
                break
        assert not leader.is_leader and term.cancelled == 1 and term.running == 0
        assert metrics.leader._value.get() == 0
        stopping.set()
        await task

    asyncio.run(scenario())


@pytest.mark.fast
def test_a_leader_that_cannot_reach_the_router_db_stops_its_loop_before_the_lease_expires(
    db: RouterDB,
) -> None:
    class FailingDB(RouterDB):
        broken = False

        def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
            if self.broken:
                raise ConnectionError("router DB unreachable")
            return super().acquire_lease(name, holder, ttl_seconds)

    async def scenario() -> float:
        flaky = FailingDB(db.engine)
        term = CountingTerm()
        leader = Leadership(db=flaky, metrics=Metrics(), config=LeaderConfig(lease_seconds=3))
        stopping = asyncio.Event()
        task = asyncio.create_task(leader.run(stopping, term))
        await asyncio.sleep(0.5)
        assert leader.is_leader
        flaky.broken = True
        broke = time.monotonic()
        while leader.is_leader:
            await asyncio.sleep(0.05)
        stopped_after = time.monotonic() - broke
        assert term.running == 0
        stopping.set()
        await task
        return stopped_after

    # The last renewal was at most a third of the lease before the failure: the loop must stop
    # before that renewal's lease runs out (3 s), never after.
    assert asyncio.run(scenario()) < 3.0


def test_once_refuses_to_act_beside_a_live_leader_but_dry_run_still_looks(tmp_path: Path) -> None:
    import subprocess
    import sys

    db_path = tmp_path / "router.db"
    router = RouterDB(f"sqlite:///{db_path}")
    router.create_schema()
    assert router.acquire_lease("reconciler", "other-host:1:abc", 60)
    config = tmp_path / "reconciler.toml"
    config.write_text(
        f'[airflow]\nbase_url = "http://127.0.0.1:9"\n[router_db]\nurl = "sqlite:///{db_path}"\n'
        '[[agents]]\nid = "agent-1"\nurl = "http://127.0.0.1:9"\n'
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "AIRFLOW_PASSWORD": "pw",
        "AGENTIC_SIDECAR_TOKEN": "t",
        "AGENTIC_AGENT_TOKEN": "t",
    }

    def once(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "reconciler", "once", "--config", str(config), *extra]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)

    acting = once()
    assert acting.returncode == 3
    assert "refusing to act: replica other-host:1:abc leads" in acting.stderr
    looking = once("--dry-run")
    assert looking.returncode == 1  # Airflow is unreachable here: the cycle reports it, changes nothing
    assert '"dry_run": true' in looking.stdout
    assert router.lease_holder("reconciler") == "other-host:1:abc"
    router.dispose()
