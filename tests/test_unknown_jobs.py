"""A job its answering agent no longer knows ends FAILED, naming the agent; a job it knows never does.

The agent forgets a job when its VM is recreated with the same id and URL and an empty state directory,
or when its retention removed a finished job whose exit nobody read. The sidecar's catch-up then gets a
full change-feed answer without the job; a direct ``GET /jobs/{id}`` answered 404 by the agent itself
(its own JSON error, from the agent that ``/health`` says is there) confirms it, and the job ends
within two cycles. Anything less certain (a partial answer, an error, a timeout, a proxy's 404 page, an
answer from another agent) leaves the job as it is and asks in full again next cycle.

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
from typing import Any

import httpx
import psutil
import pytest
from aiohttp import ClientError, ClientSession, web

from agent_api.client import JobNotFound
from agent_api.protocol import AgentJobStatus, JobInfo
from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.served import ServedAirflow, ServedApp
from harness.sidecar import AgentRef, SidecarProcess
from reconciler.agent_reports import denies, forgotten_reason, plan
from router_db import JobRecord, JobStatus, TaskInstanceKey

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
