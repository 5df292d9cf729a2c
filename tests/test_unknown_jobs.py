"""A job its answering agent no longer knows ends FAILED, naming the agent; a job it knows never does.

The agent forgets a job when its VM is recreated with the same id and URL and an empty state directory,
or when its retention removed a finished job whose exit nobody read. The sidecar's catch-up then gets a
full change-feed answer without the job; a direct ``GET /jobs/{id}`` answered 404 by the agent itself
(its own JSON error, from the process its registration holds, as ``/health`` shows) confirms it, and
the job ends within two cycles, whatever the reads of its other missing jobs do. Anything less certain
(a partial answer, an error, a timeout, a proxy's 404 page, an answer from another agent or another
process of it) leaves the job as it is and asks in full again next cycle.

Real processes: the sidecar, agents (SIGKILLed, their homes wiped, started again on the same port) and,
for the uncertain answers, a proxy in front of an agent. The rules themselves are pinned without them.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest
from aiohttp import ClientError, ClientSession, web
from sqlalchemy import update

from agent_api.client import AgentClient, JobNotFound
from agent_api.protocol import AgentJobStatus, JobInfo, StopAction, StopResult
from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.scripted import ScriptedAirflow
from harness.served import ServedAirflow, ServedApp
from harness.sidecar import AgentRef, SidecarProcess
from harness.wiring import nobody_waits
from reconciler.config import PollConfig, StopConfig
from reconciler.core import agent_reports
from reconciler.core.agent_reports import Recorded, apply_agent_reports, denies, forgotten_reason, plan
from reconciler.core.agent_sync import refresh_from_agent
from reconciler.core.outcome import start_grace
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.core.submissions import Submissions
from reconciler.core.watch import JobWatch
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import AgentRecord, JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey
from router_db.models import JobRow

INTERVAL = 1.0  # the sidecar's poll interval: "two cycles" is two of these
FLEET = "[fleet]\nlost_after_seconds = 120\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
# The agent's retention removes every finished job at once, read or not.
REMOVE_EXITS_AT_ONCE = "\n".join(
    ["retain_finished_seconds = 0", "retain_unread_seconds = 0", "retention_check_seconds = 0.2", ""]
)
PASSED_HEADERS = ("content-type", "x-log-size", "x-next-offset")  # what the proxy passes back


# --- the rules, without a network --------------------------------------------------------------------


def record(job_id: str, status: JobStatus, *, agent_id: str = "vm1") -> JobRecord:
    created = NOW - timedelta(seconds=600)
    return JobRecord(
        job_id, TaskInstanceKey(dag_id="d", task_id=job_id, run_id="r"), agent_id, "true", status,
        None, None, None, created, created, None, None,
    )  # fmt: skip


@pytest.mark.fast
def test_only_running_jobs_a_full_answer_lacks_are_to_confirm() -> None:
    records = {
        "running": record("running", JobStatus.RUNNING),
        "stopping": record("stopping", JobStatus.STOPPING),  # its stop finds out (a tombstone answers)
        "queued": record("queued", JobStatus.QUEUED),  # given up by a stop, as before
        "listed": record("listed", JobStatus.RUNNING),
        "elsewhere": record("elsewhere", JobStatus.RUNNING, agent_id="vm2"),  # never judged by vm1's answer
    }
    listed = [JobInfo("listed", AgentJobStatus.RUNNING, 1, None, NOW, None, None)]
    full = plan(records, listed, agent_id="vm1", full=True, now=NOW)
    assert [job.job_id for job in full.unknown] == ["running"]
    assert [job.job_id for job in full.give_up] == ["queued"]
    assert full.transitions == []
    partial = plan(records, listed, agent_id="vm1", full=False, now=NOW)
    assert partial.unknown == [] and partial.give_up == [] and partial.transitions == []


@pytest.mark.fast
def test_only_the_agents_own_404_for_that_job_denies_it() -> None:
    own = "job 'j1' is not known to this agent"
    assert denies("j1", JobNotFound(404, own, request="GET"))
    assert not denies("j2", JobNotFound(404, own, request="GET"))  # about another job
    assert not denies("j1", JobNotFound(404, "<html><body>404 Not Found</body></html>", request="GET"))
    assert not denies("j1", JobNotFound(404, "Not Found", request="GET"))  # a route the agent lacks
    assert forgotten_reason("vm1") == "agent vm1 no longer knows this job (its state was lost or removed)"


# --- the confirmation, against an agent in process ------------------------------------------------------


FINGERPRINT, OTHER_HOME = "f" * 64, "e" * 64  # identity fingerprints: the registered home's, another's


class ForgetfulAgent:
    """vm1 in process, as the agent pool serves it (client and prober alike): it knows the jobs in
    ``known`` and denies every other with its own 404, but gives no answer about those in ``hang`` and
    answers those in ``proxied`` with a proxy's 404 page. ``/healthz`` answers ``health``."""

    base_url = "http://vm1.test:8791"

    def __init__(self, *, registration: dict[str, str] | None = None) -> None:
        self.known: dict[str, JobInfo] = {}
        self.hang: set[str] = set()
        self.proxied: set[str] = set()
        self.health_answer: dict[str, Any] = {"status": "ok", "agent_id": "vm1"}
        if registration is not None:
            self.health_answer["registration"] = registration
        self.stops: list[str] = []

    async def get(self, job_id: str) -> JobInfo:
        if job_id in self.hang:
            await asyncio.Event().wait()
        if job_id in self.known:
            return self.known[job_id]
        where = f"GET {self.base_url}/jobs/{job_id}"
        if job_id in self.proxied:
            raise JobNotFound(404, "<html><body>404 Not Found</body></html>", request=where)
        raise JobNotFound(404, f"job {job_id!r} is not known to this agent", request=where)

    async def health(self) -> dict[str, Any]:
        return self.health_answer

    async def stop(self, job_id: str, *, force: bool = False, reason: str = "") -> StopResult:
        self.stops.append(job_id)  # an unknown job's stop leaves a tombstone
        return StopResult(
            True, "tombstone", AgentJobStatus.FAILED, None, StopAction.ALREADY_FINISHED, None, reason
        )

    def client(self, agent_id: str) -> AgentClient:
        return cast(AgentClient, self)

    prober = client


def running_jobs(db: RouterDB, count: int) -> list[str]:
    keys = [TaskInstanceKey(dag_id="d", task_id=f"t{i}", run_id="r") for i in range(count)]
    return db.import_running([NewJob(key, "vm1", "sleep 300") for key in keys], source="test")


def full_answer_without(db: RouterDB, agent: ForgetfulAgent, **options: Any) -> Recorded:
    """What the catch-up records of vm1's full change-feed answer listing only ``agent.known``."""

    async def record() -> Recorded:
        pool, watch = cast(AgentPool, agent), JobWatch(db)
        listed = list(agent.known.values())
        return await apply_agent_reports(db, pool, watch, "vm1", listed, full=True, now=db.now(), **options)

    return asyncio.run(record())


def register_vm1(db: RouterDB, *, instance: str) -> None:
    now = db.now()
    db.heartbeat_agent_now(
        AgentRecord(
            "vm1", ForgetfulAgent.base_url, (), 0, 1, "1.0", False, instance, now, now,
            identity_fingerprint=FINGERPRINT,
        ),
        alive_within=30.0,
    )  # fmt: skip


@pytest.mark.fast
def test_one_unanswered_confirmation_holds_back_no_other_forgotten_job(
    db: RouterDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_reports, "CONFIRM_TIMEOUT_SECONDS", 0.5)
    slow, *forgotten = running_jobs(db, 3)
    agent = ForgetfulAgent()
    agent.hang.add(slow)  # its read never answers: a hung connection, an overloaded agent
    recorded = full_answer_without(db, agent)
    after = db.get_many([slow, *forgotten])
    assert [(after[j].status, after[j].reason) for j in forgotten] == [
        (JobStatus.FAILED, forgotten_reason("vm1"))
    ] * 2
    assert after[slow].status is JobStatus.RUNNING  # asked about again, from a full answer
    assert recorded == Recorded(changed=2, settled=False)
    agent.hang.clear()
    assert full_answer_without(db, agent) == Recorded(changed=1, settled=True)
    assert db.get_many([slow])[slow].status is JobStatus.FAILED


@pytest.mark.fast
@pytest.mark.parametrize(
    ("registered", "shown", "ends"),
    [
        (None, None, True),  # configured in [[agents]]: its id (and its own token) are all it has
        ("i-1", {"instance": "i-1", "identity_fingerprint": FINGERPRINT}, True),  # the registered process
        ("i-1", {"instance": "i-2", "identity_fingerprint": FINGERPRINT}, False),  # another copy of its home
        ("i-1", {"instance": "i-1", "identity_fingerprint": OTHER_HOME}, False),  # another home
        ("i-1", None, False),  # shows no registration: no telling which process it is
    ],
)
def test_only_the_registered_process_denying_a_job_ends_it(
    db: RouterDB, registered: str | None, shown: dict[str, str] | None, ends: bool
) -> None:
    if registered is not None:
        register_vm1(db, instance=registered)
    (job_id,) = running_jobs(db, 1)
    recorded = full_answer_without(db, ForgetfulAgent(registration=shown))
    after = db.get_many([job_id])[job_id]
    assert (after.status is JobStatus.FAILED) is ends, after
    assert recorded.settled is ends  # kept: asked in full again next cycle


@pytest.mark.fast
def test_a_queued_job_its_agent_does_not_know_waits_out_the_configured_give_up(db: RouterDB) -> None:
    """The catch-up's start grace is [fleet] submit_give_up_seconds plus one /run's timeout, the
    bound the submission's own follow-up and the leader's sweep keep: never a shorter one of its own."""
    grace = start_grace(give_up_seconds=300.0, run_timeout=10.0)
    submissions = Submissions(db=db, agents=cast(AgentPool, None), give_up_seconds=300.0, run_timeout=10.0)
    assert grace == 310.0 == submissions.start_grace  # the leader's sweep waits as long
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="q", run_id="r"), "vm1", "sleep 300"))
    records = {job.job_id: job}
    for age, given_up in [(70.0, False), (309.0, False), (310.0, True)]:
        now = job.created_at + timedelta(seconds=age)
        todo = plan(records, [], agent_id="vm1", full=True, now=now, start_grace=grace)
        assert [j.job_id for j in todo.give_up] == ([job.job_id] if given_up else []), age
    agent = ForgetfulAgent()
    later = job.created_at + timedelta(seconds=200.0)  # the default's grace long past
    pool = cast(AgentPool, agent)
    assert asyncio.run(refresh_from_agent(db, pool, job, now=later, start_grace=grace)) is job
    full_answer_without(db, agent, start_grace=grace)  # the router DB's now: a second old
    assert agent.stops == [] and db.get_many([job.job_id])[job.job_id].status is JobStatus.QUEUED


class FeedAgent(ForgetfulAgent):
    """:class:`ForgetfulAgent` with a change feed: every answer is full (it restarted, as far as the
    sidecar can tell), listing ``known``."""

    async def changed_since(self, cursor: str | None) -> tuple[list[JobInfo], str, bool]:
        return list(self.known.values()), "c1", True

    def ids(self) -> list[str]:
        return ["vm1"]


@pytest.mark.fast
@pytest.mark.parametrize(("give_up", "given_up"), [(60.0, True), (300.0, False)])
def test_the_loops_catch_up_keeps_the_configured_give_up(
    db: RouterDB, give_up: float, given_up: bool
) -> None:
    """A QUEUED job 100 s old that its agent's full answer lacks: given up with the default bound
    (60 s + a /run's 10 s), kept while a longer configured one may still have its /run on the way."""
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="q", run_id="r"), "vm1", "sleep 300"))
    with db.engine.begin() as conn:
        conn.execute(
            update(JobRow)
            .where(JobRow.job_id == job.job_id)
            .values(created_at=db.now() - timedelta(seconds=100))
        )
    agent = FeedAgent()
    pool = cast(AgentPool, agent)
    metrics = Metrics()
    loop = build_core(
        db=db,
        airflow=ScriptedAirflow(truth={}),
        agents=pool,
        dispatcher=StopDispatcher(db, pool, metrics, StopConfig(attempts=1), changed=nobody_waits),
        metrics=metrics,
        poll=PollConfig(strategy="incremental"),
        start_grace_seconds=start_grace(give_up_seconds=give_up, run_timeout=10.0),
    ).loop
    asyncio.run(loop.sync.catch_up.run(["vm1"]))
    after = db.get_many([job.job_id])[job.job_id]
    assert (after.status is JobStatus.FAILED, agent.stops == [job.job_id]) == (given_up, given_up)


@pytest.mark.fast
def test_the_rolling_sweep_takes_only_the_agents_own_404_as_a_denial(db: RouterDB) -> None:
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="q", run_id="r"), "vm1", "sleep 300"))
    long_after = job.created_at + timedelta(hours=1)
    agent = ForgetfulAgent()
    agent.proxied.add(job.job_id)  # a proxy's 404 page says nothing of the job

    def refresh() -> JobRecord:
        return asyncio.run(refresh_from_agent(db, cast(AgentPool, agent), job, now=long_after))

    assert refresh() is job and agent.stops == []
    agent.proxied.clear()  # the agent's own 404: it never started the job
    ended = refresh()
    assert (ended.status, ended.reason) == (JobStatus.FAILED, "agent never started the job")
    assert agent.stops == [job.job_id]


# --- real processes ------------------------------------------------------------------------------------


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    served.start()
    try:
        yield served
    finally:
        served.stop()


def sidecar_for(tmp_path: Path, airflow: ServedAirflow, agents: list[AgentRef]) -> SidecarProcess:
    return SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=agents,
        api_version="v2",
        interval_seconds=INTERVAL,
        extra_config=FLEET,
    )


def submit(client: httpx.Client, airflow: ServedAirflow, agent_id: str, task_id: str, command: str) -> str:
    airflow.call_soon(airflow.standin.add, "d", "r", task_id, -1, "deferred", 1)  # Airflow wants it
    body = {"command": command, "agent_id": agent_id, "dag_id": "d", "task_id": task_id, "run_id": "r"}
    answer = client.post("/jobs", json={**body, "try_number": 1})
    assert answer.status_code == 201, answer.text
    job: dict[str, Any] = answer.json()
    assert job["status"] == "RUNNING", job
    return str(job["job_id"])


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
    return answer


def cycles(client: httpx.Client) -> dict[str, float]:
    """``reconciler_cycles_total`` by result."""
    text = client.get("/metrics").text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^reconciler_cycles_total\{result="(\w+)"\} (\S+)$', text, re.M)
    }


def crash_vm(agent: AgentProcess) -> None:
    """The VM dies with all its work: the agent and every process it started, SIGKILLed."""
    root = psutil.Process(agent.pid)
    tree = [*root.children(recursive=True), root]
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    agent.process.wait()
    agent._proc = None


def ends_within_two_cycles(
    client: httpx.Client, job_id: str, since: float, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait for the job to end; fail unless at most two cycles completed after ``since`` (the count of
    cycles once the agent answered again)."""
    ended = wait_for(
        lambda: (j := job(client, job_id))["status"] != "RUNNING" and j, "the job's end", timeout
    )
    taken = sum(cycles(client).values()) - since
    assert taken <= 2, f"the job ended only after {taken:g} cycles"
    return ended


def test_a_job_its_recreated_agent_no_longer_knows_ends_failed_and_others_run_on(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    vm1 = AgentProcess(tmp_path / "vm1", agent_id="vm1", token="t1")
    vm2 = AgentProcess(tmp_path / "vm2", agent_id="vm2", token="t2")
    sidecar = sidecar_for(tmp_path, airflow, [AgentRef("vm1", vm1.url, "t1"), AgentRef("vm2", vm2.url, "t2")])
    again = AgentProcess(tmp_path / "vm1", agent_id="vm1", token="t1", port=vm1.port)
    try:
        vm1.start()
        vm2.start()
        sidecar.start()
        with sidecar.client() as client:
            lost = submit(client, airflow, "vm1", "lost", "sleep 300")
            healthy = submit(client, airflow, "vm2", "healthy", "sleep 300")
            time.sleep(2 * INTERVAL)  # a few cycles: the catch-up holds a cursor of vm1's first process
            crash_vm(vm1)
            shutil.rmtree(vm1.home)  # recreated: same id and URL, empty state directory
            again.start()
            since = sum(cycles(client).values())
            fresh = submit(client, airflow, "vm1", "fresh", "sleep 300")  # started while the sidecar looks
            ended = ends_within_two_cycles(client, lost, since)
            assert ended["status"] == "FAILED", ended
            assert ended["reason"] == "agent vm1 no longer knows this job (its state was lost or removed)"
            time.sleep(3 * INTERVAL)  # more cycles: nothing else is ended by this
            assert job(client, healthy)["status"] == "RUNNING"
            assert job(client, fresh)["status"] == "RUNNING"
            assert cycles(client).get("error", 0) == 0
        logged = sidecar.log_path.read_text()
        assert "vm1" in logged and "no longer knows" in logged
    finally:
        sidecar.stop()
        again.stop()
        vm1.stop()
        vm2.stop()


def test_a_job_whose_unread_exit_retention_removed_ends_failed(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    vm1 = AgentProcess(tmp_path / "vm1", agent_id="vm1", token="t1")
    sidecar = sidecar_for(tmp_path, airflow, [AgentRef("vm1", vm1.url, "t1")])
    # The agent started again elsewhere first, its retention set to remove unread exits at once (as a
    # clock jumped 30 days forward at boot makes every unread exit old enough): the sidecar cannot read
    # the exit before it is gone.
    pruning = AgentProcess(
        tmp_path / "vm1",
        agent_id="vm1",
        token="t1",
        extra_config=REMOVE_EXITS_AT_ONCE,
    )
    again = AgentProcess(tmp_path / "vm1", agent_id="vm1", token="t1", port=vm1.port)
    try:
        vm1.start()
        sidecar.start()
        with sidecar.client() as client:
            job_id = submit(client, airflow, "vm1", "short", "sleep 2")
            vm1.kill()  # the agent crashes; its job runs on and exits while no agent watches it
            time.sleep(3)
            pruning.start()
            wait_for(lambda: f"job {job_id} removed (retention)" in pruning.log_text(), "the retention", 15)
            pruning.stop()
            assert job(client, job_id)["status"] == "RUNNING"  # nobody read its exit
            again.start()
            ended = ends_within_two_cycles(client, job_id, sum(cycles(client).values()))
            assert ended["status"] == "FAILED", ended
            assert ended["reason"] == "agent vm1 no longer knows this job (its state was lost or removed)"
            assert cycles(client).get("error", 0) == 0
    finally:
        sidecar.stop()
        again.stop()
        pruning.stop()
        vm1.stop()


class Proxy(ServedApp):
    """In front of an agent: passes every request through, except ``GET /jobs/{id}``, which it answers
    as ``mode`` says: ``pass``, ``html404`` (a proxy's own 404 page), ``502``, or ``hang``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.reads = 0  # GET /jobs/{id} answered other than by passing through
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        super().__init__(app)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        single = request.method == "GET" and re.fullmatch(r"/jobs/[^/]+", request.path) is not None
        if single and self.mode != "pass":
            self.reads += 1
            if self.mode == "html404":
                return web.Response(status=404, text="<html><body><h1>404 Not Found</h1></body></html>")
            if self.mode == "502":
                return web.Response(status=502, text="Bad Gateway")
            await asyncio.sleep(8)  # "hang": longer than the sidecar waits (5 s)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            async with (
                ClientSession() as session,
                session.request(
                    request.method,
                    self.upstream + request.path_qs,
                    data=await request.read(),
                    headers=headers,
                ) as answer,
            ):
                body = await answer.read()
                kept = {k: v for k, v in answer.headers.items() if k.lower() in PASSED_HEADERS}
                return web.Response(status=answer.status, body=body, headers=kept)
        except ClientError:  # the agent is down
            return web.Response(status=502, text="Bad Gateway")


def test_uncertain_answers_never_end_a_job_and_the_agents_own_404_then_does(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    vm1 = AgentProcess(tmp_path / "vm1", agent_id="vm1", token="t1")
    proxy = Proxy(vm1.url)
    sidecar = sidecar_for(tmp_path, airflow, [AgentRef("vm1", proxy.url, "t1")])
    again = AgentProcess(tmp_path / "vm1", agent_id="vm1", token="t1", port=vm1.port)
    try:
        vm1.start()
        proxy.start()
        sidecar.start()
        with sidecar.client() as client:
            job_id = submit(client, airflow, "vm1", "behind", "sleep 300")
            time.sleep(2 * INTERVAL)
            crash_vm(vm1)
            shutil.rmtree(vm1.home)
            proxy.mode = "html404"
            again.start()  # its first answer is full, without the job
            for mode in ("html404", "502", "hang"):
                proxy.mode = mode
                read = proxy.reads
                # Each cycle asks in full again and reads the job again: it stays RUNNING meanwhile.
                wait_for(lambda: proxy.reads >= read + 2, f"two direct reads answered {mode}", 40)  # noqa: B023
                assert job(client, job_id)["status"] == "RUNNING", mode
            proxy.mode, read = "502", proxy.reads
            wait_for(lambda: proxy.reads > read, "a read after the hung one", 40)  # no read hangs now
            proxy.mode = "pass"
            ended = ends_within_two_cycles(client, job_id, sum(cycles(client).values()))
            assert ended["status"] == "FAILED", ended
            assert ended["reason"] == "agent vm1 no longer knows this job (its state was lost or removed)"
            assert cycles(client).get("error", 0) == 0
    finally:
        sidecar.stop()
        again.stop()
        vm1.stop()
        proxy.stop()
