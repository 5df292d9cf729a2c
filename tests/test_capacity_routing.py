"""Routing by capacity: which agent takes a new job, and what the submitter hears when none may.

The choice itself is pure (:mod:`reconciler.fleet.routing`) and is pinned here without a network; the
submission path (:class:`JobService`) runs against a SQLite router DB and, for an agent's own refusal,
in-process stand-in agents. The last test runs real agents (max_jobs 2, 1 and no limit) behind a
real sidecar process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from harness.wiring import said_of
from reconciler.api.statuses import status_of
from reconciler.config import AgentEntry
from reconciler.core.job_service import NO_CAPACITY_RETRY_AFTER, JobService
from reconciler.core.watch import JobWatch
from reconciler.errors import NoRoom
from reconciler.fleet.agents import AgentPool, NoAgent, NoCapacity
from reconciler.fleet.routing import (
    Candidate,
    Capacity,
    choose,
    free_slots,
    label_set,
    no_capacity,
    unavailable,
)
from reconciler.metrics import Metrics
from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey
from sidecar_api.protocol import SubmitRequest

fast = pytest.mark.fast


# ------------------------------------------------------------------------------- the pure choice


@fast
def test_the_agent_with_the_most_free_slots_is_chosen_and_no_limit_beats_any() -> None:
    four_one = Candidate("a", capacity=Capacity(max_jobs=4), active=1)  # 3 free
    two_none = Candidate("b", capacity=Capacity(max_jobs=2), active=0)  # 2 free
    unlimited = Candidate("c", capacity=Capacity(max_jobs=0), active=50)
    unknown = Candidate("d", capacity=Capacity(max_jobs=None), active=7)  # an older agent: no limit
    assert choose([four_one, two_none]) == "a"
    assert choose([two_none, four_one, unlimited]) == "c"
    assert free_slots(unknown) == free_slots(unlimited) == float("inf")
    assert free_slots(Candidate("e", capacity=Capacity(max_jobs=2), active=5)) == 0  # never negative


@fast
def test_ties_go_to_the_agent_chosen_longest_ago() -> None:
    tied = [
        Candidate("a", capacity=Capacity(max_jobs=2), last_pick=7),
        Candidate("b", capacity=Capacity(max_jobs=2), last_pick=3),
        Candidate("c", capacity=Capacity(max_jobs=2), last_pick=9),
    ]
    assert choose(tied) == "b"
    never = [Candidate("z", last_pick=0), Candidate("y", last_pick=0)]
    assert choose(never) == "y"  # equal turns: by id, so the order is stable


@fast
def test_lost_wrong_identity_draining_full_and_refusing_agents_are_skipped() -> None:
    skipped = [
        Candidate("lost", blocked="lost"),
        Candidate("other", blocked="wrong_identity"),
        Candidate("drains", capacity=Capacity(draining=True)),
        Candidate("full", capacity=Capacity(max_jobs=4), active=4),
        Candidate("said-no", refused="agent said-no is full: 2 of max_jobs 2 running"),
    ]
    assert choose(skipped) is None
    assert [unavailable(c) for c in skipped] == [
        "lost",
        "wrong_identity",
        "draining",
        "full 4/4",
        "refused (agent said-no is full: 2 of max_jobs 2 running)",
    ]
    assert choose([*skipped, Candidate("room", capacity=Capacity(max_jobs=1))]) == "room"


@fast
def test_the_no_capacity_answer_names_every_agent_and_why() -> None:
    agents = [
        Candidate("vm-1", capacity=Capacity(max_jobs=4), active=4),
        Candidate("vm-2", capacity=Capacity(draining=True)),
        Candidate("vm-3", blocked="lost"),
    ]
    assert no_capacity(agents, labels=["gpu", "gpu"], pinned=False) == (
        "no capacity: 3 agent(s) carry labels ['gpu']: vm-1 full 4/4, vm-2 draining, vm-3 lost"
    )
    assert no_capacity(agents[1:2], labels=[], pinned=True) == "no capacity: agent_id vm-2: vm-2 draining"


@fast
def test_a_label_set_is_one_canonical_metric_value() -> None:
    assert label_set(["gpu", "default", "gpu"]) == "default,gpu"
    assert label_set([]) == "(none)"


# ---------------------------------------------------------------------------- the pool's routing


def pool(*entries: AgentEntry) -> AgentPool:
    return AgentPool(list(entries), {e.id: "capacity-test-token" for e in entries}, timeout=5, stop_timeout=5)


def entry(agent_id: str, *labels: str, url: str = "http://127.0.0.1:9") -> AgentEntry:
    return AgentEntry(agent_id, url, labels=list(labels))


@fast
def test_the_pool_takes_turns_among_equals_and_fills_the_freest_first() -> None:
    agents = pool(entry("a", "x"), entry("b", "x"), entry("c", "x"), entry("d", "y"))
    # No limits known (agents that never said): turns among all three carrying "x".
    assert [agents.route(agent_id=None, labels=["x"]) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    limits = {"a": 2, "b": 1, "c": 2}
    said_of(agents).limits = lambda agent_id: Capacity(max_jobs=limits.get(agent_id))
    load: dict[str, int] = {}
    chosen = []
    for _ in range(5):
        agent_id = agents.route(agent_id=None, labels=["x"], load=load)
        load[agent_id] = load.get(agent_id, 0) + 1
        chosen.append(agent_id)
    # a and c (2 free) take turns, then all three have 1 free and take turns again.
    assert chosen[:2] in (["a", "c"], ["c", "a"]) and sorted(chosen) == ["a", "a", "b", "c", "c"]
    with pytest.raises(NoCapacity, match=r"^no capacity: 3 agent\(s\) carry labels \['x'\]: a full 2/2, "):
        agents.route(agent_id=None, labels=["x"], load=load)
    with pytest.raises(NoAgent, match="no agent has labels"):
        agents.route(agent_id=None, labels=["z"], load=load)


@fast
def test_the_pool_skips_lost_wrong_identity_and_draining_agents() -> None:
    agents = pool(entry("lost"), entry("other"), entry("drains"), entry("fine"))
    said_of(agents).avoid = lambda agent_id: agent_id in ("lost", "other")  # as the fleet's liveness says
    said_of(agents).refuse = lambda agent_id: "another agent answers there" if agent_id == "other" else None
    said_of(agents).limits = lambda agent_id: Capacity(draining=agent_id == "drains")
    assert {agents.route(agent_id=None, labels=[]) for _ in range(5)} == {"fine"}
    said_of(agents).limits = lambda agent_id: Capacity(draining=True)
    with pytest.raises(NoCapacity) as refused:
        agents.route(agent_id=None, labels=[])
    assert str(refused.value).endswith(": drains draining, fine draining, lost lost, other wrong_identity")


@fast
def test_a_pinned_agent_that_drains_or_is_full_gets_the_no_capacity_answer() -> None:
    agents = pool(entry("a"), entry("b"))
    said_of(agents).limits = lambda agent_id: Capacity(draining=agent_id == "a", max_jobs=1)
    with pytest.raises(NoCapacity, match=r"^no capacity: agent_id a: a draining$"):
        agents.route(agent_id="a", labels=[])
    with pytest.raises(NoCapacity, match=r"^no capacity: agent_id b: b full 1/1$"):
        agents.route(agent_id="b", labels=[], load={"b": 1})
    assert agents.route(agent_id="b", labels=[], load={"b": 0}) == "b"
    # A lost one is returned: the submission answers that case itself (503 "agent b is lost").
    said_of(agents).avoid = lambda agent_id: True
    assert agents.route(agent_id="b", labels=[], load={"b": 0}) == "b"


# ------------------------------------------------------------------------ the submission's answers


class Answering:
    """What JobService asks of the agents' sync: every agent answers."""

    def answering(self, agent_id: str) -> bool:
        return True


def service(db: RouterDB, agents: AgentPool, *, when_full: str, metrics: Metrics) -> JobService:
    return JobService(
        db=db,
        agents=agents,
        fleet=None,  # every agent answers, none fences
        confirmer=None,  # type: ignore[arg-type]  # no update_status here
        sync=Answering(),  # type: ignore[arg-type]
        dispatcher=None,  # type: ignore[arg-type]
        when_full=when_full,
        metrics=metrics,
        watch=JobWatch(db),
    )


def request(task_id: str, **route: Any) -> SubmitRequest:
    return SubmitRequest(
        dag_id="d",
        task_id=task_id,
        run_id="r",
        map_index=-1,
        try_number=1,
        command="true",
        agent_id=route.get("agent_id"),
        labels=route.get("labels", []),
        payload={"command": "true", "cwd": None, "env": None, "run_as": None, "timeout_seconds": None},
    )


@fast
@pytest.mark.parametrize(("when_full", "status"), [("wait", 503), ("refuse", 409)])
def test_no_room_is_answered_as_when_full_says_and_records_nothing(
    db: RouterDB, when_full: str, status: int
) -> None:
    agents = pool(entry("a", "gpu"), entry("b", "gpu"))
    said_of(agents).limits = lambda agent_id: Capacity(max_jobs=1, draining=agent_id == "b")
    db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="running", run_id="r"), "a", "sleep 1"))
    metrics = Metrics()
    jobs = service(db, agents, when_full=when_full, metrics=metrics)

    with pytest.raises(NoRoom) as refused:
        asyncio.run(jobs.submit(request("new", labels=["gpu"])))
    assert status_of(refused.value) == status
    assert refused.value.retry_after == (NO_CAPACITY_RETRY_AFTER if when_full == "wait" else None)
    assert str(refused.value) == "no capacity: 2 agent(s) carry labels ['gpu']: a full 1/1, b draining"
    assert [job.key.task_id for job in db.search()] == ["running"]
    assert metrics.no_capacity._value.get() == 1

    # The same try submitted again (the operator's retry after its worker died) is its job, whatever
    # the capacity: a submission is idempotent.
    again = asyncio.run(jobs.submit(request("running", labels=["gpu"])))
    assert (again.created, again.job.key.task_id) == (False, "running")
    assert metrics.no_capacity._value.get() == 1


def agent_app(agent_id: str, *, busy: str | None, seen: list[str]) -> web.Application:
    """An agent's POST /run: 503 with ``busy`` as its error (full or draining), else 201."""

    async def run(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(agent_id)
        if busy is not None:
            return web.json_response({"error": busy}, status=503, headers={"Retry-After": "5"})
        now = datetime.now(UTC).isoformat()
        job = {"job_id": body["job_id"], "status": "RUNNING", "pid": 4242, "rc": None}
        return web.json_response({**job, "started_at": now, "finished_at": None, "reason": None}, status=201)

    app = web.Application()
    app.router.add_post("/run", run)
    return app


async def submit_to(
    db: RouterDB, busy: Mapping[str, str | None], req: SubmitRequest, seen: list[str]
) -> tuple[Any, Metrics]:
    servers = {a: TestServer(agent_app(a, busy=b, seen=seen), host="127.0.0.1") for a, b in busy.items()}
    for server in servers.values():
        await server.start_server()
    agents = pool(*(entry(a, "x", url=str(s.make_url(""))) for a, s in servers.items()))
    metrics = Metrics()
    try:
        jobs = service(db, agents, when_full="wait", metrics=metrics)
        try:
            return await jobs.submit(req), metrics
        except NoRoom as exc:
            return exc, metrics
    finally:
        await agents.close()
        for server in servers.values():
            await server.close()


@fast
def test_an_agent_that_says_full_at_run_leaves_no_job_and_the_job_goes_to_another(db: RouterDB) -> None:
    # The sidecar thinks "a" has room (its load is not what the agent counts): "a" refuses the job.
    seen: list[str] = []
    busy = {"a": "agent a is full: 3 of max_jobs 3 running", "b": None}
    submitted, _ = asyncio.run(submit_to(db, busy, request("t", labels=["x"]), seen))
    assert seen == ["a", "b"]
    assert (submitted.created, submitted.job.agent_id, submitted.job.status) == (True, "b", JobStatus.RUNNING)
    (job,) = db.search()
    assert job.agent_id == "b"
    assert [e.new_status for e in db.events(job.job_id)] == ["QUEUED", "RUNNING"]


@fast
def test_when_every_agent_says_full_at_run_the_submitter_is_told_to_retry_and_no_job_is_left(
    db: RouterDB,
) -> None:
    seen: list[str] = []
    busy = {"a": "agent a is full: 3 of max_jobs 3 running", "b": "agent b is draining: it takes no new job"}
    refused, metrics = asyncio.run(submit_to(db, busy, request("t", labels=["x"]), seen))
    assert sorted(seen) == ["a", "b"]  # each agent asked once
    assert isinstance(refused, NoRoom) and status_of(refused) == 503 and refused.retry_after
    assert str(refused) == (
        "no capacity: 2 agent(s) carry labels ['x']: a refused (agent a is full: 3 of max_jobs 3 running), "
        "b refused (agent b is draining: it takes no new job)"
    )
    assert db.search() == []  # no QUEUED job left behind: the operator's retry routes afresh
    assert metrics.no_capacity._value.get() == 1
    # The retry, once an agent has room, creates the job.
    seen.clear()
    submitted, _ = asyncio.run(submit_to(db, {"a": None}, request("t", labels=["x"]), seen))
    assert (submitted.created, submitted.job.status) == (True, JobStatus.RUNNING)


@fast
def test_a_job_pinned_to_an_agent_that_says_draining_is_not_sent_elsewhere(db: RouterDB) -> None:
    seen: list[str] = []
    busy = {"a": "agent a is draining: it takes no new job", "b": None}
    refused, _ = asyncio.run(submit_to(db, busy, request("t", agent_id="a"), seen))
    assert seen == ["a"]
    assert isinstance(refused, NoRoom)
    assert str(refused) == "no capacity: agent_id a: a refused (agent a is draining: it takes no new job)"
    assert db.search() == []


def test_forgetting_a_refused_job_leaves_a_job_that_moved_alone(router_db: RouterDB) -> None:
    """On SQLite (fast) and on PostgreSQL: the audit rows go with the job (ON DELETE CASCADE)."""
    db = router_db
    job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "a", "true"))
    assert not db.forget_unstarted(job.job_id, agent_id="b")  # not b's
    db.mark_running(job.job_id, source="test")
    assert not db.forget_unstarted(job.job_id, agent_id="a")  # it started meanwhile
    assert db.get(job.job_id) is not None and len(db.events(job.job_id)) == 2
    queued, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="u", run_id="r"), "a", "true"))
    assert db.active_counts() == {"a": 2}
    assert db.forget_unstarted(queued.job_id, agent_id="a")
    assert db.get(queued.job_id) is None and db.events(queued.job_id) == []
    assert db.active_counts() == {"a": 1}


# ------------------------------------------------------------------------------- real processes


FAST_FLEET = "[fleet]\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"


def submit(client: httpx.Client, task_id: str, **route: Any) -> httpx.Response:
    body = {"command": "sleep 60", "dag_id": "d", "task_id": task_id, "run_id": "r", "try_number": 1}
    return client.post("/jobs", json={**body, **route})


def test_submissions_fill_the_agents_by_free_capacity(tmp_path: Path, airflow: ServedAirflow) -> None:
    """Agents with max_jobs 2, 1 and none (0) behind a real sidecar: the unlimited one takes every job
    while it takes jobs; drained, the others fill by free slots, then the answer is 503 naming each."""
    with (
        AgentProcess(tmp_path / "two", agent_id="two", token="t2", max_jobs=2) as two,
        AgentProcess(tmp_path / "one", agent_id="one", token="t1", max_jobs=1) as one,
        AgentProcess(tmp_path / "any", agent_id="any", token="t0", max_jobs=0) as unlimited,
        SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[AgentRef(a.agent_id, a.url, a.token, labels=["pool"]) for a in (two, one, unlimited)],
            api_version="v2",
            extra_config=FAST_FLEET,
        ) as sidecar,
        sidecar.client() as client,
    ):
        for task in ("u0", "u1", "u2", "t0", "t1", "t2"):  # Airflow wants every job: none is stopped
            airflow.call_soon(airflow.standin.add, "d", "r", task, -1, "running", 1)
        wait_for(
            lambda: (
                {a["agent_id"]: a["max_jobs"] for a in client.get("/agents").json()["agents"]}
                == {"any": 0, "one": 1, "two": 2}
            ),
            "the agents' limits heard",
        )
        placed = [submit(client, f"u{n}", labels=["pool"]).json()["agent_id"] for n in range(3)]
        assert placed == ["any", "any", "any"]  # no limit: always the most free slots

        assert client.post("/agents/any/drain").json()["state"] == "draining"
        placed = [submit(client, f"t{n}", labels=["pool"]).json()["agent_id"] for n in range(3)]
        # "two" has 2 free, then both have 1 free (turns), then the other one.
        assert placed[0] == "two" and sorted(placed[1:]) == ["one", "two"]
        refused = submit(client, "late", labels=["pool"])
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"] == (
            "no capacity: 3 agent(s) carry labels ['pool']: any draining, one full 1/1, two full 2/2"
        )
        metrics = client.get("/metrics").text
        assert "reconciler_no_capacity_total 1.0" in metrics
        assert 'reconciler_agent_capacity{labels="pool"} 3.0' in metrics  # "any" drains: 2 + 1
        wait_for(
            lambda: 'reconciler_agent_active_jobs{labels="pool"} 6.0' in client.get("/metrics").text, "load"
        )
        by_agent = {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}
        assert {a: (v["active_jobs"], v["state"]) for a, v in by_agent.items()} == {
            "any": (3, "draining"),
            "one": (1, "live"),
            "two": (2, "live"),
        }
