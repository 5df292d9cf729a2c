"""Two sidecar replicas on one PostgreSQL router DB, one of them running two minutes behind (libfaketime),
and a real agent that registers and heartbeats to the one behind while the other leads; and the same
with the leader's clock the one set wrong, two minutes ahead.

Times one replica writes and another compares come from the router DB's clock, so the skew changes
nothing: the agent stays live, its job runs on (its process too), and the job's end, recorded by the
replica behind, wakes a long-poll waiting on the other one at once. Without processes: the leader's
liveness judges heartbeats by the router DB's clock alone, and a step of that clock, forward or back,
loses nobody; stepped back, it makes no second leader; a stop whose read of it fails stays pending.
"""

from __future__ import annotations

import asyncio
import gc
import glob
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy.exc import OperationalError

from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.sidecar import SidecarProcess
from harness.wiring import nobody_waits
from reconciler.config import AgentEntry, FleetConfig, LeaderConfig, StopConfig
from reconciler.core.decision import Divergence, Stop
from reconciler.core.leadership import Leadership
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.agent_state import AgentState
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.liveness import Fleet
from reconciler.metrics import Metrics
from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey
from router_db.leases import Leases
from servicekit.credentials import Secret
from tests.heartbeats import beat

SKEW_SECONDS = 120
FLEET_TOKEN = "fleet-token-for-clock-skew"
HEARTBEAT_SECONDS = 1.0  # suspect after 3 s of silence (the leader reads the heartbeats each second)


def libfaketime() -> str:
    """Debian's libfaketime (scripts/ensure-tools installs it)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing: run scripts/ensure-tools (Debian's faketime package)"
    return found[0]


@dataclass
class Replica(SidecarProcess):
    """A replica whose loop reads the agents' changes only once a minute: what the test sees of the
    agent's job comes through its heartbeats, to the replica behind."""

    def env(self) -> dict[str, str]:
        return {**super().env(), "AGENTIC_RECONCILER_POLL_AGENT_CATCH_UP_SECONDS": "60"}


def faketime(offset: str) -> dict[str, str]:
    """The wall clock (time.time, datetime.now) moved by ``offset``; the monotonic clock is left alone
    (FAKETIME_DONT_FAKE_MONOTONIC), as a clock set wrong leaves it."""
    return {"LD_PRELOAD": libfaketime(), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@dataclass
class SkewedReplica(Replica):
    """A replica whose wall clock runs SKEW_SECONDS behind."""

    def env(self) -> dict[str, str]:
        return {**super().env(), **faketime(f"-{SKEW_SECONDS}s")}


@dataclass
class AheadReplica(SidecarProcess):
    """A replica whose wall clock runs SKEW_SECONDS ahead, and whose loop reads the agents' changes
    every second (the default): as the leader, it judges every heartbeat and every job's age there."""

    def env(self) -> dict[str, str]:
        return {**super().env(), **faketime(f"+{SKEW_SECONDS}s")}


def replica(
    cls: type[SidecarProcess], workdir: Path, db_url: str, lost_after: float, *, interval: float = 60.0
) -> SidecarProcess:
    return cls(
        workdir=workdir,
        airflow_url=f"http://127.0.0.1:{free_port()}",  # unreachable: the loop never stops a job
        airflow_password="unused",
        agents=[],
        db_url=db_url,
        interval_seconds=interval,  # 60: with agent_catch_up_seconds, the loop reads no agent meanwhile
        lease_seconds=min(5.0, lost_after - 1),  # below lost_after_seconds, as the config requires
        fleet_token=FLEET_TOKEN,
        extra_config=(
            f"[fleet]\nlost_after_seconds = {lost_after}\n"
            "check_interval_seconds = 1.0\ncheck_timeout_seconds = 1.0\n"
        ),
    )


def role(sidecar: SidecarProcess) -> str:
    return str(httpx.get(f"{sidecar.url}/readyz", timeout=5).json()["role"])


def clock_of(sidecar: SidecarProcess) -> float:
    """The replica's wall clock as its HTTP Date header gives it (to the second)."""
    date = httpx.get(f"{sidecar.url}/healthz", timeout=5).headers["date"]
    return parsedate_to_datetime(date).timestamp()


@dataclass
class Stand:
    leader: SidecarProcess  # on the true clock (the router DB's), or SKEW_SECONDS ahead of it
    behind: SidecarProcess  # SKEW_SECONDS behind the leader; the agent heartbeats here
    agent: AgentProcess


@contextmanager
def stand(
    tmp_path: Path, postgres_url: str, *, lost_after: float, leader_ahead: bool = False
) -> Iterator[Stand]:
    """``leader_ahead``: the leader's clock is the one set wrong (ahead), the other replica's is true."""
    with ExitStack() as stack:
        first = replica(AheadReplica, tmp_path / "leader", postgres_url, lost_after, interval=1.0)
        leader = stack.enter_context(
            first if leader_ahead else replica(Replica, tmp_path / "leader", postgres_url, lost_after)
        )
        wait_for(lambda: role(leader) == "leader", "the first replica leads", timeout=30)
        second = replica(
            Replica if leader_ahead else SkewedReplica, tmp_path / "behind", postgres_url, lost_after
        )
        behind = stack.enter_context(second)
        assert role(behind) == "standby"
        skew = clock_of(leader) - clock_of(behind)
        assert SKEW_SECONDS - 3 <= skew <= SKEW_SECONDS + 3, f"libfaketime skewed the replica by {skew} s"
        port = free_port()
        agent = AgentProcess(
            tmp_path / "vm",
            agent_id="vm-skew",
            port=port,
            token=FLEET_TOKEN,
            accepted_tokens=[],
            extra_config=f'heartbeat_seconds = {HEARTBEAT_SECONDS}\nlabels = ["pool"]\n',
            extra_env={
                "ROUTER_URL": behind.url,
                "SELF_URL": f"http://127.0.0.1:{port}",
                "AGENTIC_FLEET_TOKEN": FLEET_TOKEN,
                "AGENTIC_AGENT_TOKEN": "",
            },
        )
        stack.enter_context(agent)
        # Listed by both (a standby reads the agents when asked): the replica behind routes to it too.
        wait_for(lambda: all(map(listed, (leader, behind))), "the agent listed by both replicas", timeout=30)
        yield Stand(leader, behind, agent)


def listed(sidecar: SidecarProcess) -> bool:
    with sidecar.client() as client:
        return agent_state(client) != "unknown"


def agent_state(client: httpx.Client) -> str:
    found = {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}
    return str(found.get("vm-skew", {}).get("state", "unknown"))


def submit(client: httpx.Client, task_id: str, command: str) -> str:
    body = {"command": command, "agent_id": "vm-skew", "dag_id": "d", "task_id": task_id, "run_id": "r"}
    answer = client.post("/jobs", json={**body, "try_number": 1})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def job_pid(agent: AgentProcess, job_id: str) -> int:
    headers = {"Authorization": f"Bearer {agent.call_token()}"}  # as the sidecar calls it

    def pid() -> Any:
        return httpx.get(f"{agent.url}/jobs/{job_id}", headers=headers, timeout=5).json().get("pid")

    return int(wait_for(pid, "the job's pid"))


def test_an_agent_heartbeating_to_a_replica_two_minutes_behind_stays_live_and_its_job_runs(
    tmp_path: Path, postgres_url: str
) -> None:
    """With each replica's own clock, the leader judged every heartbeat written by the replica behind
    two minutes old: suspect at once, lost after lost_after_seconds, its job FAILED and its process
    killed by the orphan sweep. Watched for three times lost_after_seconds, nothing of that happens."""
    lost_after = 6.0
    with stand(tmp_path, postgres_url, lost_after=lost_after) as s, s.leader.client() as client:
        with s.behind.client() as through_behind:  # submitted through the replica behind, too
            job = submit(through_behind, "kept", "sleep 120")
        nothing_lost(s, client, [job], seconds=3 * lost_after)


def test_a_leader_two_minutes_ahead_declares_no_agent_lost_and_ends_no_job_early(
    tmp_path: Path, postgres_url: str
) -> None:
    """The leader's own wall clock runs two minutes ahead of the router DB's, and its loop reads the
    agent every second. Had it judged a time the router DB wrote (a heartbeat, a job's created_at) by its
    own clock, the agent's heartbeats would look two minutes old (lost after lost_after_seconds, its
    jobs FAILED) and every job two minutes older than it is. Jobs submitted through either replica run
    on, the agent stays live, for three times lost_after_seconds."""
    lost_after = 6.0
    with (
        stand(tmp_path, postgres_url, lost_after=lost_after, leader_ahead=True) as s,
        s.leader.client() as client,
        s.behind.client() as through_behind,
    ):
        jobs = [submit(through_behind, "kept", "sleep 120"), submit(client, "led", "sleep 120")]
        nothing_lost(s, client, jobs, seconds=3 * lost_after)


def nothing_lost(s: Stand, client: httpx.Client, jobs: list[str], *, seconds: float) -> None:
    """Every job RUNNING (its process too) and the agent live all along, as the leader sees them."""

    def running() -> bool:
        return all(client.get(f"/jobs/{job}").json()["status"] == "RUNNING" for job in jobs)

    wait_for(running, "running", timeout=30)
    pids = [job_pid(s.agent, job) for job in jobs]
    states: set[str] = set()
    watch_until = time.monotonic() + seconds
    while time.monotonic() < watch_until:
        states.add(agent_state(client))
        time.sleep(0.2)
    # Judged by the leader's own clock, every heartbeat would look two minutes old: lost within
    # lost_after_seconds. A heartbeat late on a loaded machine may make it suspect for a moment.
    assert "live" in states and states <= {"live", "suspect"}, states
    for job, pid in zip(jobs, pids, strict=True):
        answer = client.get(f"/jobs/{job}").json()
        assert answer["status"] == "RUNNING", answer
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert "agent vm-skew lost" not in s.leader.log_path.read_text()
    assert (role(s.leader), role(s.behind)) == ("leader", "standby")  # the leader judged it all along


def test_a_job_ended_through_a_replica_two_minutes_behind_wakes_a_long_poll_on_the_other(
    tmp_path: Path, postgres_url: str
) -> None:
    """The job's end reaches the router DB through the replica behind (the agent's heartbeat carries
    it; the leader's catch-up read is a minute away). A trigger-style long-poll on the leader answers
    within a few seconds, not when its wait runs out: the change was written at the router DB's time."""
    with stand(tmp_path, postgres_url, lost_after=300.0) as s, s.leader.client() as client:
        release = tmp_path / "release"
        command = f"while [ ! -e {release} ]; do sleep 0.1; done; exit 0"
        with s.behind.client() as through_behind:
            job = submit(through_behind, "ends", command)
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "RUNNING", "running", timeout=30)

        released: list[float] = []

        def end_the_job() -> None:
            time.sleep(1.0)  # the long-poll below is waiting by then
            release.touch()
            released.append(time.monotonic())

        ender = threading.Thread(target=end_the_job)
        ender.start()
        try:
            answer = client.get(f"/jobs/{job}", params={"wait": 25, "status": "RUNNING"}).json()
            heard = time.monotonic()
        finally:
            ender.join()
        assert answer["status"] == "SUCCEEDED", answer
        assert heard - released[0] < 10.0, heard - released[0]  # not the 25 s of a lost wake-up


# ------------------------------------------------------------------------------------ no processes


class SteppedRouterDB(RouterDB):
    """A router DB whose clock runs ``step`` seconds ahead of this process's (SQLite's is this process's
    own): it moves with the test's fake monotonic clock, and can be stepped as a server's clock is."""

    step = 0.0

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=self.step)


@pytest.mark.fast
def test_liveness_reads_heartbeat_ages_on_the_router_db_clock_and_a_step_of_it_loses_nobody(
    tmp_path: Path,
) -> None:
    """The leader's fleet on a fake monotonic clock: an agent heartbeating every 0.5 s stays live while
    that clock runs far beyond lost_after_seconds (its heartbeats' ages come from the router DB's
    clock, not from this process's wall clock), goes suspect when its heartbeats stop, and is not lost
    when the router DB's clock jumps ten minutes forward between two of its heartbeats, nor when it is
    stepped ten minutes back (a heartbeat from its future is no older than now: its age is 0)."""
    db = SteppedRouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    config = FleetConfig(lost_after_seconds=5.0, check_interval_seconds=1.0, check_timeout_seconds=1.0)
    ticks = [1000.0]
    pool = AgentPool([], {}, timeout=1, stop_timeout=1)
    fleet = Fleet(
        db=db,
        agents=pool,
        metrics=Metrics(),
        config=config,
        clock=lambda: ticks[0],
        registered_token=Secret("fleet"),
        changed=nobody_waits,
    )

    async def run(seconds: float, *, beating: bool) -> set[AgentState]:
        """Tick every 0.5 s of the fake clock, reading the agents each time, as the leader does."""
        seen: set[AgentState] = set()
        for _ in range(int(seconds / 0.5)):
            ticks[0] += 0.5
            db.step += 0.5
            if beating:
                beat(db, "vm-1")
            await fleet.load_registered()
            await fleet.tick()
            seen.add(fleet.state("vm-1"))
        return seen

    async def scenario() -> None:
        try:
            beat(db, "vm-1")
            fleet.reset()
            assert await run(20.0, beating=True) == {AgentState.LIVE}  # 4 x lost_after_seconds
            db.step += 600.0  # between two heartbeats: the last one now looks ten minutes old
            jumped = await run(1.0, beating=False)
            assert AgentState.LOST not in jumped, jumped
            assert await run(3.0, beating=True) == {AgentState.LIVE}
            db.step -= 1200.0  # NTP steps it back: the last heartbeat now looks ten minutes ahead
            stepped_back = await run(1.0, beating=False)
            assert AgentState.LOST not in stepped_back, stepped_back
            assert await run(3.0, beating=True) == {AgentState.LIVE}
            assert await run(2.0, beating=False) == {AgentState.LIVE, AgentState.SUSPECT}  # silent
            assert await run(3.0, beating=True) == {AgentState.LIVE}
            db.step -= 600.0  # stepped back again, and the agent dies at that moment
            # Its last heartbeat looks ten minutes ahead of the clock; its silence counts all the same.
            assert AgentState.LOST in await run(8.0, beating=False)
        finally:
            await fleet.close()
            await pool.close()
            db.dispose()

    asyncio.run(scenario())


class ClocklessRouterDB(RouterDB):
    """A router DB whose time cannot be read while ``failing``: the server went away mid-query."""

    failing = False

    def now(self) -> datetime:
        if self.failing:
            raise OperationalError("SELECT now()", {}, ConnectionError("server closed the connection"))
        return super().now()


@pytest.mark.fast
def test_a_stop_whose_router_db_time_cannot_be_read_stays_pending_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each stop reads the router DB's time (its force_after_seconds is measured on that clock). That
    read failing is a router DB outage like any other: the stop stays STOPPING, counted a retry, and the
    next cycle's resume sends it; no task of the dispatcher dies of it unseen."""
    db = ClocklessRouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    key = TaskInstanceKey(dag_id="d", task_id="t", run_id="r", map_index=-1, try_number=1)
    job, _ = db.submit(NewJob(key, "agent-1", "sleep 60"))
    job = db.mark_running(job.job_id, source="test")
    unreachable = f"http://127.0.0.1:{free_port()}"  # the agent call, once sent, fails fast
    pool = AgentPool([AgentEntry(id="agent-1", url=unreachable)], {"agent-1": "t"}, timeout=1, stop_timeout=1)
    metrics = Metrics()
    dispatcher = StopDispatcher(db, pool, metrics, StopConfig(attempts=1), changed=nobody_waits)
    retries = metrics.stop_requests.labels("retry")
    unhandled: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unhandled.append(context))
        try:
            db.failing = True
            (stopping,) = await dispatcher.stop_many(
                [(job, Stop(Divergence.TI_FAILED, JobStatus.FAILED, "task instance is failed"))], source="t"
            )
            assert stopping is not None and stopping.stop_requested_at is not None
            await dispatcher.finish(10)
            gc.collect()  # a task that died of an exception nobody retrieved says so when collected
            assert unhandled == [] and dispatcher.inflight == 0
            assert retries._value.get() == 1
            assert "router DB unavailable; stop resumes next cycle" in caplog.text
            db.failing = False
            dispatcher.resume(stopping)  # the next cycle's resume: the agent call goes out this time
            await dispatcher.finish(10)
            assert retries._value.get() == 2 and "agent unreachable" in caplog.text
            gc.collect()
            assert unhandled == []
        finally:
            await pool.close()

    with caplog.at_level(logging.WARNING, logger="reconciler.core.stops"):
        asyncio.run(scenario())
    stopped = db.get(job.job_id)
    db.dispose()
    assert stopped is not None and stopped.status is JobStatus.STOPPING


@pytest.mark.fast
def test_a_step_back_of_the_router_db_clock_makes_no_second_leader_and_delays_no_takeover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas campaign on one router DB whose clock (the leases' SQL "now") is stepped ten minutes
    back while the first leads. The lease it holds then looks ten minutes longer: the second cannot take
    it, and the first renews it on the stepped clock as before (only its own lease is renewed, whatever
    its expiry). So the first leads on, alone; killed, it is succeeded within a lease of its last renewal
    on the stepped clock, not ten minutes later."""
    step = [0.0]
    stepless = Leases._db_now
    monkeypatch.setattr(Leases, "_db_now", lambda self, plus=0.0: stepless(self, plus + step[0]))
    db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    config = LeaderConfig(lease_seconds=1.0)  # renewed every third of a second
    first, second = (
        Leadership(db=db, metrics=Metrics(), config=config, holder=name) for name in ("first", "second")
    )

    async def term(over: asyncio.Event) -> None:
        await over.wait()

    async def scenario() -> None:
        stopping = asyncio.Event()
        leading = asyncio.create_task(first.run(stopping, term))
        await wait_async(lambda: first.is_leader, "the first leads")
        standing_by = asyncio.create_task(second.run(stopping, term))
        try:
            await asyncio.sleep(1.0)
            step[0] = -600.0
            watch_until = time.monotonic() + 3.0  # three leases, nine renewals, nine campaigns
            while time.monotonic() < watch_until:
                assert first.is_leader and not second.is_leader, (first.is_leader, second.is_leader)
                await asyncio.sleep(0.01)
            leading.cancel()  # dies without giving the lease up
            await asyncio.gather(leading, return_exceptions=True)
            died = time.monotonic()
            await wait_async(lambda: second.is_leader, "the second takes over", timeout=10)
            assert time.monotonic() - died < 3.0  # a lease and a campaign, not the ten minutes stepped
        finally:
            stopping.set()
            await asyncio.gather(leading, standing_by, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        db.dispose()


async def wait_async(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        await asyncio.sleep(0.01)
