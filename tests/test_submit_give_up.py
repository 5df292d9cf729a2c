"""A job whose agent does not take it ends within ``[fleet] submit_give_up_seconds``, through a real
sidecar process; a job that may run on its agent is never ended on a guess.

The agents are a real agent process (a refusal on the merits: a 4xx) and stand-ins served on loopback
that answer ``/healthz`` like an agent and ``/run`` as each test needs: always a 500 (an agent that
keeps failing), a 500 twice then the job (a transient fault), or the job only after the sidecar's
10 s request timeout (a ``/run`` that may have started it). One configured agent has nothing
listening. Airflow is unreachable: no job is stopped because of it. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from aiohttp import web

from agent_api.client import AgentBusy, AgentClient, AgentRejected, AgentUnavailable, JobNotFound
from agent_api.protocol import AgentJobStatus, JobInfo, StopAction, StopResult
from harness.agent import AgentProcess
from harness.processes import free_port
from harness.served import ServedApp
from harness.sidecar import AgentRef, SidecarProcess
from reconciler.core.outcome import (
    AskAgent,
    Finish,
    GiveUp,
    MarkRunning,
    Resend,
    RunAnswer,
    Unchanged,
    after_never_started_stop,
    after_run,
    after_unsettled_read,
    given_up,
)
from reconciler.core.submissions import Submissions, run_answer
from reconciler.fleet.agents import AgentPool, WrongAgent
from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey

GIVE_UP = 4.0  # [fleet] submit_give_up_seconds here
LOST_AFTER = 12.0  # [fleet] lost_after_seconds here
SLACK = 10.0  # a loaded machine's delays on top of a bound
RUN_TIMEOUT = 10.0  # the sidecar's agent requests time out after this long
INTERVAL = 0.3
TOKEN = "stand-in-token"
FLEET = f"""
[fleet]
submit_give_up_seconds = {GIVE_UP}
lost_after_seconds = {LOST_AFTER}
check_interval_seconds = 0.5
check_timeout_seconds = 2.0
"""


# ------------------------------------------------------------------------------------- stand-ins


@dataclass
class StandIn:
    """An agent's HTTP surface on loopback: healthy, with ``/run`` answered by ``behaviour`` (sent
    the run's number for that job id, from 1) and everything else a 500, as an agent whose job
    manager fails. ``runs`` keeps (job id, monotonic time) of every ``/run``."""

    agent_id: str
    behaviour: Callable[[str, int], Any]  # -> the web.Response to answer, or a coroutine making it
    runs: list[tuple[str, float]] = field(default_factory=list)
    started: dict[str, dict[str, Any]] = field(default_factory=dict)  # jobs it says it runs
    served: ServedApp | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/health", self._health)
        app.router.add_post("/run", self._run)
        app.router.add_get("/jobs/{job_id}", self._job)
        app.router.add_route("*", "/{tail:.*}", self._broken)
        return app

    @property
    def url(self) -> str:
        assert self.served is not None
        return self.served.url

    def sends(self, job_id: str) -> list[float]:
        return [at for sent, at in self.runs if sent == job_id]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "agent_id": self.agent_id,
                "jobs_running": len(self.started),
                "max_jobs": 0,
                "draining": False,
                "version": "stand-in",
            }
        )

    async def _run(self, request: web.Request) -> web.StreamResponse:
        job_id = (await request.json())["job_id"]
        self.runs.append((job_id, time.monotonic()))
        answer = self.behaviour(job_id, len(self.sends(job_id)))
        return await answer if asyncio.iscoroutine(answer) else answer  # type: ignore[no-any-return]

    async def _job(self, request: web.Request) -> web.Response:
        job = self.started.get(request.match_info["job_id"])
        if job is None:
            return await self._broken(request)
        return web.json_response(job)

    async def _broken(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "internal error in the agent (logged)"}, status=500)

    def start_job(self, job_id: str) -> dict[str, Any]:
        """It runs ``job_id`` from now on: the answer to its /run and to GET /jobs/{id}."""
        now = datetime.now(UTC).isoformat()
        job = {"job_id": job_id, "status": "RUNNING", "pid": 4242, "rc": None, "started_at": now}
        self.started[job_id] = job | {"finished_at": None, "reason": None}
        return self.started[job_id]


def always_500(job_id: str, n: int) -> web.Response:
    return web.json_response({"error": "internal error in the agent (logged)"}, status=500)


@pytest.fixture(scope="module")
def stand_ins() -> Iterator[dict[str, StandIn]]:
    broken = StandIn("agent-broken", always_500)
    flaky = StandIn("agent-flaky", lambda job_id, n: always_500(job_id, n))
    flaky.behaviour = lambda job_id, n: (
        always_500(job_id, n) if n <= 2 else web.json_response(flaky.start_job(job_id), status=201)
    )
    slow = StandIn("agent-slow", always_500)

    async def too_late(job_id: str, n: int) -> web.Response:
        job = slow.start_job(job_id)  # it started the job, and answers after the sidecar gave up
        await asyncio.sleep(RUN_TIMEOUT + 2)
        return web.json_response(job, status=201)

    slow.behaviour = too_late
    stand_ins = {s.agent_id: s for s in (broken, flaky, slow)}
    for stand_in in stand_ins.values():
        stand_in.served = ServedApp(stand_in.app())
        stand_in.served.start()
    yield stand_ins
    for stand_in in stand_ins.values():
        assert stand_in.served is not None
        stand_in.served.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path_factory.mktemp("real") / "home", agent_id="agent-real", token=TOKEN) as proc:
        yield proc


def sidecar_for(workdir: Path, stand_ins: dict[str, StandIn], agent: AgentProcess) -> SidecarProcess:
    refs = [AgentRef(s.agent_id, s.url, TOKEN, labels=[s.agent_id]) for s in stand_ins.values()]
    refs.append(AgentRef("agent-real", agent.url, TOKEN, labels=["agent-real"]))
    refs.append(AgentRef("agent-down", f"http://127.0.0.1:{free_port()}", TOKEN, labels=["agent-down"]))
    return SidecarProcess(
        workdir=workdir,
        airflow_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: Airflow never stops a job
        airflow_password="unused",
        agents=refs,
        interval_seconds=INTERVAL,
        lease_seconds=2.0,  # a restarted sidecar waits out its killed predecessor's lease
        extra_config=FLEET,
    )


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory, stand_ins: dict[str, StandIn], agent: AgentProcess
) -> Iterator[SidecarProcess]:
    with sidecar_for(tmp_path_factory.mktemp("sidecar"), stand_ins, agent) as proc:
        yield proc


def submit(client: httpx.Client, agent_id: str, **payload: Any) -> dict[str, Any]:
    body = {
        "command": "sleep 60",
        "agent_id": agent_id,
        "dag_id": "give_up",
        "task_id": f"t{time.monotonic_ns()}",
        "run_id": "manual__1",
        "try_number": 1,
        **payload,
    }
    answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def wait_for(
    client: httpx.Client, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float
) -> float:
    """Seconds until the job satisfies ``done``; fails after ``timeout``."""
    started = time.monotonic()
    job: dict[str, Any] = {}
    while time.monotonic() - started < timeout:
        job = client.get(f"/jobs/{job_id}").json()
        if done(job):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not as expected within {timeout} s: {job}")


def trail(client: httpx.Client, job_id: str) -> list[str]:
    return [e["new_status"] for e in client.get(f"/jobs/{job_id}/events").json()["events"]]


# ------------------------------------------------------------------------------------- real processes


def test_a_job_its_agent_keeps_answering_500_ends_failed_within_the_bound(
    sidecar: SidecarProcess, stand_ins: dict[str, StandIn]
) -> None:
    keeps_answering_500(sidecar, stand_ins["agent-broken"])


def test_on_postgresql_a_job_its_agent_keeps_answering_500_ends_failed_within_the_bound(
    tmp_path: Path, stand_ins: dict[str, StandIn], agent: AgentProcess, postgres_url: str
) -> None:
    sidecar = sidecar_for(tmp_path / "sidecar", stand_ins, agent)
    sidecar.db_url = postgres_url
    with sidecar:
        keeps_answering_500(sidecar, stand_ins["agent-broken"])


def keeps_answering_500(sidecar: SidecarProcess, broken: StandIn) -> None:
    with sidecar.client() as client:
        submitted = time.monotonic()
        job = submit(client, "agent-broken")
        assert job["status"] == "QUEUED"  # the answer gave no verdict: the job is sent again
        took = wait_for(client, job["job_id"], lambda j: j["status"] == "FAILED", GIVE_UP + SLACK)
        assert time.monotonic() - submitted >= GIVE_UP - 0.5, "ended before the bound: not sent again"
        reason = client.get(f"/jobs/{job['job_id']}").json()["reason"]
        assert "submit_give_up_seconds" in reason and "HTTP 500" in reason, reason
        assert "internal error in the agent" in reason and "never started" in reason, reason
        sends = broken.sends(job["job_id"])
        assert len(sends) >= 3, sends  # sent again with backoff until the bound
        time.sleep(2.0)
        assert broken.sends(job["job_id"]) == sends  # and never after its end
        assert trail(client, job["job_id"]) == ["QUEUED", "FAILED"]
        assert took <= GIVE_UP + SLACK


def test_a_refusal_on_the_merits_ends_the_job_failed_at_once_with_the_agents_words(
    sidecar: SidecarProcess,
) -> None:
    with sidecar.client() as client:
        long_cwd = submit(client, "agent-real", cwd="/tmp/" + "a" * 256)
        assert long_cwd["status"] == "FAILED", long_cwd
        assert "payload.cwd: cannot be used: File name too long" in long_cwd["reason"], long_cwd
        no_user = submit(client, "agent-real", run_as="no-such-user-here")
        assert no_user["status"] == "FAILED", no_user
        assert "payload.run_as" in no_user["reason"], no_user
        assert trail(client, long_cwd["job_id"]) == ["QUEUED", "FAILED"]


def test_a_transient_500_is_sent_again_and_the_job_runs(
    sidecar: SidecarProcess, stand_ins: dict[str, StandIn]
) -> None:
    flaky = stand_ins["agent-flaky"]
    with sidecar.client() as client:
        job = submit(client, "agent-flaky")
        assert job["status"] == "QUEUED"
        wait_for(client, job["job_id"], lambda j: j["status"] == "RUNNING", GIVE_UP + SLACK)
        assert len(flaky.sends(job["job_id"])) == 3
        assert trail(client, job["job_id"]) == ["QUEUED", "RUNNING"]


def test_a_job_whose_run_timed_out_is_read_from_its_agent_before_anything_ends_it(
    sidecar: SidecarProcess, stand_ins: dict[str, StandIn]
) -> None:
    slow = stand_ins["agent-slow"]
    with sidecar.client() as client:
        job = submit(client, "agent-slow")  # answers after the sidecar's own timeout, 10 s
        assert job["status"] == "QUEUED"
        wait_for(client, job["job_id"], lambda j: j["status"] != "QUEUED", SLACK)
        assert client.get(f"/jobs/{job['job_id']}").json()["status"] == "RUNNING"
        assert len(slow.sends(job["job_id"])) == 1  # past the bound: read, not sent again
        assert trail(client, job["job_id"]) == ["QUEUED", "RUNNING"]


def test_a_job_whose_agent_does_not_answer_at_all_waits_for_the_lost_rule(
    tmp_path: Path, stand_ins: dict[str, StandIn], agent: AgentProcess
) -> None:
    # A sidecar of its own: agent-down is not lost yet when the job is submitted.
    with sidecar_for(tmp_path / "sidecar", stand_ins, agent) as sidecar, sidecar.client() as client:
        job = submit(client, "agent-down")
        assert job["status"] == "QUEUED"
        time.sleep(GIVE_UP + 2.0)  # past the bound: it might run there, so it is not ended on a guess
        assert client.get(f"/jobs/{job['job_id']}").json()["status"] == "QUEUED"
        wait_for(client, job["job_id"], lambda j: j["status"] == "FAILED", LOST_AFTER + SLACK)
        reason = client.get(f"/jobs/{job['job_id']}").json()["reason"]
        assert "agent-down lost" in reason, reason


def test_a_sidecar_killed_while_following_a_job_settles_it_after_its_restart(
    tmp_path: Path, stand_ins: dict[str, StandIn], agent: AgentProcess
) -> None:
    """The restarted leader's sweep finds the job nobody follows. It cannot know whether a /run of it
    went unanswered, and the agent answers every read with a 500: the job ends once that has lasted
    lost_after_seconds past the bound, as a lost agent's would."""
    broken = stand_ins["agent-broken"]
    sidecar = sidecar_for(tmp_path / "sidecar", stand_ins, agent)
    try:
        sidecar.start()
        with sidecar.client() as client:
            submitted = time.monotonic()
            job = submit(client, "agent-broken")
        assert sidecar.proc is not None
        sidecar.proc.kill()  # SIGKILL, that PID only: the payload it kept in memory is gone
        sidecar.proc.wait(timeout=10)
        sidecar.proc = None
        sends = len(broken.sends(job["job_id"]))
        sidecar.start()
        with sidecar.client() as client:
            bound = GIVE_UP + LOST_AFTER
            wait_for(client, job["job_id"], lambda j: j["status"] == "FAILED", bound + 2 * SLACK)
            reason = client.get(f"/jobs/{job['job_id']}").json()["reason"]
            assert trail(client, job["job_id"]) == ["QUEUED", "FAILED"]
        assert time.monotonic() - submitted >= bound - 0.5
        assert "still QUEUED" in reason and "lost_after_seconds" in reason, reason
    finally:
        sidecar.stop()
    assert len(broken.sends(job["job_id"])) == sends  # the restarted sidecar never sent it again


# ------------------------------------------------------------------------------------- the rules


def test_how_a_run_that_gave_no_job_ended() -> None:
    where = "POST http://127.0.0.1:1/run"
    assert run_answer(AgentBusy(503, "full", request=where, retry_after=5)) is RunAnswer.BUSY
    assert run_answer(AgentRejected(409, "exists", request=where)) is RunAnswer.CONFLICT
    assert run_answer(AgentRejected(400, "payload.cwd", request=where)) is RunAnswer.REFUSED
    assert run_answer(AgentUnavailable("HTTP 500", answered=500)) is RunAnswer.FAILED
    assert run_answer(AgentUnavailable("HTTP 502: <html>")) is RunAnswer.NO_ANSWER
    assert run_answer(AgentUnavailable("no answer within 10 s")) is RunAnswer.NO_ANSWER
    assert run_answer(WrongAgent("agent-2 answers at its URL")) is RunAnswer.NOT_SENT
    assert [answer for answer in RunAnswer if answer.may_have_run] == [RunAnswer.NO_ANSWER]


@pytest.mark.parametrize("answer", list(RunAnswer))
@pytest.mark.parametrize("age", [0.0, GIVE_UP - 0.1, GIVE_UP, 10 * GIVE_UP])
def test_after_run(answer: RunAnswer, age: float) -> None:
    outcome = after_run(answer, age=age, give_up_seconds=GIVE_UP, error="HTTP 4xx: why")
    if answer is RunAnswer.REFUSED:
        assert outcome == Finish(JobStatus.FAILED, None, "agent refused the job: HTTP 4xx: why")
    elif answer is RunAnswer.CONFLICT:
        assert outcome == AskAgent()  # the agent has a job of this id: its own word decides
    else:
        assert outcome == (Resend() if age < GIVE_UP else AskAgent())


@pytest.mark.parametrize("overdue", [False, True])
@pytest.mark.parametrize("doubtful", [False, True])
@pytest.mark.parametrize("answer", [None, *AgentJobStatus])
def test_after_unsettled_read(overdue: bool, doubtful: bool, answer: AgentJobStatus | None) -> None:
    why = "not taken"
    unanswered = after_unsettled_read(answer, answered=False, doubtful=doubtful, overdue=overdue, why=why)
    # No answer: a job no /run may have started ends; the others once their agent stays silent about
    # them lost_after_seconds more (a silent agent's jobs end sooner, by the lost rule).
    if not doubtful:
        assert unanswered == Finish(
            JobStatus.FAILED, None, f"{why}; every /run was answered with an error: never started"
        )
    elif overdue:
        assert unanswered == Finish(
            JobStatus.FAILED, None, f"{why}; its agent said nothing of it for lost_after_seconds more"
        )
    else:
        assert unanswered == Unchanged()
    read = after_unsettled_read(
        answer, answered=True, doubtful=doubtful, overdue=overdue, why=why, rc=3, reason="exited"
    )
    ended = answer in (AgentJobStatus.SUCCEEDED, AgentJobStatus.FAILED)
    assert read == {
        None: GiveUp(),
        AgentJobStatus.QUEUED: Unchanged(),  # starting there: asked again
        AgentJobStatus.RUNNING: MarkRunning(),
    }.get(answer, Finish(JobStatus(str(answer)), 3, "exited") if ended else None)


def test_given_up() -> None:
    never = after_never_started_stop(action=None, rc=None)
    assert given_up("why", never) == Finish(JobStatus.FAILED, None, "why; agent never started the job")
    assert given_up("why", None) == Finish(JobStatus.FAILED, None, "why; agent has no record of the job")


class Denying:
    """An agent's job routes in process, answering ``GET /jobs/{id}`` with a 404 of ``message``."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.stops: list[str] = []

    async def get(self, job_id: str) -> JobInfo:
        raise JobNotFound(404, self.message.format(job_id=job_id), request=f"GET /jobs/{job_id}")

    async def stop(self, job_id: str, *, force: bool = False, reason: str = "") -> StopResult:
        self.stops.append(job_id)
        return StopResult(
            True, "tombstone", AgentJobStatus.FAILED, None, StopAction.ALREADY_FINISHED, None, reason
        )

    def client(self, agent_id: str) -> AgentClient:
        return cast(AgentClient, self)


@pytest.mark.fast
def test_only_the_agents_own_404_gives_up_a_job_past_the_bound(db: RouterDB) -> None:
    """A 404 from something else (a proxy's page, a route an older agent lacks) says nothing of the job:
    it is no answer, and the job that may run there is asked about again."""
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "agent-x", "sleep 60"))
    agent = Denying("<html><body><h1>404 Not Found</h1></body></html>")
    submissions = Submissions(db=db, agents=cast(AgentPool, agent), give_up_seconds=GIVE_UP)

    def settle() -> bool:
        return asyncio.run(submissions.settle(job, why="not taken", doubtful=True))

    assert settle() is False and agent.stops == []
    assert db.get_many([job.job_id])[job.job_id].status is JobStatus.QUEUED
    agent.message = "job {job_id!r} is not known to this agent"  # the agent's own answer
    assert settle() is True and agent.stops == [job.job_id]
    ended = db.get_many([job.job_id])[job.job_id]
    assert (ended.status, ended.reason) == (JobStatus.FAILED, "not taken; agent never started the job")
