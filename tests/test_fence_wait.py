"""The sidecar never ends a fenced job FAILED while its agent's fence may not have stopped it yet.

In process, on a fake monotonic clock (the fast tier): a registered agent whose terms outlast
``lost_after_seconds`` (the sidecar restarted with a shorter one since the agent registered) goes
silent; its plain job ends FAILED when the agent is lost, its ``at_most_once`` job only once the
fence has surely fired. Such an agent takes no at_most_once job; one that would fence every job with
such terms is not registered at all (422, naming the keys on both sides, the router DB unchanged).
The real-process partition, with Airflow, is tests/test_airflow_partition.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent_api.fencing import FenceTerms
from agent_api.registration import Heartbeat, identity_fingerprint
from reconciler.agents import AgentPool
from reconciler.config import FleetConfig
from reconciler.fencing import fence_problem, fence_wait
from reconciler.fleet import AgentState, Fleet
from reconciler.job_service import Refused
from reconciler.metrics import Metrics
from reconciler.registry import FenceTooLate, Registry
from router_db import AgentRecord, JobRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey
from servicekit.credentials import Secret
from tests.test_clock_skew import SteppedRouterDB

PROOF = "1" * 64  # the agent's credential
TERMS = FenceTerms(after_seconds=3.0, grace_seconds=1.0)  # gone 3 + 0.3 + 1 = 4.3 s after the contact


@pytest.mark.fast
def test_the_rule_counts_the_fence_its_check_the_grace_and_one_heartbeat() -> None:
    assert TERMS.gone_after() == pytest.approx(4.3)
    assert fence_problem(TERMS, agent_id="vm", heartbeat_seconds=0.5, lost_after=4.9) is None
    said = fence_problem(TERMS, agent_id="vm", heartbeat_seconds=0.5, lost_after=4.8)
    assert said is not None
    for words in (
        "[agent] fence_after_seconds 3",
        "[agent] grace_seconds 1",
        "[fleet] lost_after_seconds 4.8",
    ):
        assert words in said, said
    assert fence_problem(FenceTerms(), agent_id="vm", heartbeat_seconds=60, lost_after=1) is None  # no fence
    assert fence_wait(TERMS, silent_for=2.0, margin=0.5) == pytest.approx(2.8)
    assert fence_wait(TERMS, silent_for=9.0, margin=0.5) == 0
    assert TERMS.fenced(True) and not TERMS.fenced(False) and replace(TERMS, default=True).fenced(False)
    assert not FenceTerms(grace_seconds=5, default=True).fenced(True)  # fence_after 0: fences nothing


def running(db: RouterDB, task_id: str, *, at_most_once: bool) -> JobRecord:
    job, _ = db.submit(
        NewJob(
            TaskInstanceKey(dag_id="fenced", task_id=task_id, run_id="r"), "vm", "sleep 600", "", at_most_once
        )
    )
    db.mark_running(job.job_id, source="test")
    return job


@pytest.mark.fast
def test_a_lost_agents_fenced_job_ends_failed_only_once_its_fence_has_surely_fired(tmp_path: Path) -> None:
    db = SteppedRouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    config = FleetConfig(lost_after_seconds=2.0, check_interval_seconds=0.5, check_timeout_seconds=0.5)
    ticks = [1000.0]
    pool = AgentPool([], {}, timeout=1, stop_timeout=1)
    metrics = Metrics()
    fleet = Fleet(
        db=db,
        agents=pool,
        metrics=metrics,
        config=config,
        clock=lambda: ticks[0],
        registered_token=Secret("t"),
    )
    waiting: list[float | None] = []
    now = db.now()
    record = AgentRecord(
        agent_id="vm", url="http://127.0.0.1:9", labels=(), max_jobs=0, jobs_running=0, version="",
        draining=False, instance="one", registered_at=now, last_heartbeat_at=now, heartbeat_seconds=0.5,
        fence_after_seconds=TERMS.after_seconds, fence_grace_seconds=TERMS.grace_seconds,
    )  # fmt: skip
    plain = running(db, "plain", at_most_once=False)
    fenced = running(db, "fenced", at_most_once=True)
    ended: dict[str, float] = {}

    async def scenario() -> None:
        silent_since = None
        try:
            for step in range(40):  # 20 s, a tick every 0.5 s
                ticks[0] += 0.5
                db.step += 0.5
                if step < 4:
                    db.heartbeat_agent(replace(record, last_heartbeat_at=db.now()), alive_after=db.now())
                    silent_since = ticks[0]
                await fleet.load_registered()
                await fleet.tick()
                waiting.append(metrics.registry.get_sample_value("reconciler_fence_waiting_jobs"))
                for job in (plain, fenced):
                    found = db.get(job.job_id)
                    if found is not None and not found.active and job.job_id not in ended:
                        ended[job.job_id] = ticks[0] - (silent_since or 0)
        finally:
            await fleet.close()
            await pool.close()

    asyncio.run(scenario())
    assert fleet.state("vm") is AgentState.LOST
    assert set(ended) == {plain.job_id, fenced.job_id}, ended
    assert 2.0 <= ended[plain.job_id] <= 3.0, ended  # lost_after_seconds, as ever
    assert 4.8 <= ended[fenced.job_id] <= 5.5, ended  # its fence (4.3 s) and one heartbeat (0.5 s)
    plain_now, fenced_now = db.get(plain.job_id), db.get(fenced.job_id)
    assert plain_now is not None and fenced_now is not None
    assert plain_now.status is JobStatus.FAILED and "fenced" not in (plain_now.reason or "")
    assert fenced_now.status is JobStatus.FAILED and fenced_now.at_most_once
    assert "agent vm lost" in (fenced_now.reason or "") and "fence_after_seconds=3" in (
        fenced_now.reason or ""
    )
    # While its fence may still run, the job is counted as waiting; then as fenced.
    assert max(w or 0 for w in waiting) == 1 and waiting[-1] == 0, waiting
    assert metrics.registry.get_sample_value("reconciler_fenced_jobs_total") == 1
    db.dispose()


def registry_test(
    db: RouterDB, config: FleetConfig, metrics: Metrics, beats: list[Heartbeat]
) -> list[object]:
    """Each heartbeat (a bootstrap) of agent vm, against a call-back that answers as vm: what it gave."""
    results: list[object] = []

    async def main() -> None:
        async def health(request: web.Request) -> web.Response:
            shown = {"instance": "one", "identity_fingerprint": identity_fingerprint(PROOF)}
            return web.json_response({"status": "ok", "agent_id": "vm", "registration": shown})

        async def jobs(request: web.Request) -> web.Response:
            return web.json_response({"jobs": []})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/jobs", jobs)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        registry = Registry(db=db, token=Secret("fleet"), static_ids=(), config=config, metrics=metrics)
        url = str(server.make_url("")).rstrip("/")
        try:
            for beat in beats:
                try:
                    beat = replace(beat, url=url, identity_proof=PROOF, call_token="c" * 64)
                    results.append(await registry.heartbeat("vm", beat, bootstrap=True))
                except Refused as exc:
                    results.append(exc)
        finally:
            await registry.close()
            await server.close()

    asyncio.run(main())
    return results


@pytest.mark.fast
def test_an_agent_fencing_every_job_too_late_is_not_registered_and_changes_nothing(tmp_path: Path) -> None:
    db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    metrics = Metrics()
    beat = Heartbeat(
        url="http://x", instance="one", heartbeat_seconds=0.5, fence=replace(TERMS, default=True)
    )
    (refused,) = registry_test(db, FleetConfig(lost_after_seconds=4.0), metrics, [beat])
    assert isinstance(refused, FenceTooLate) and refused.status == 422
    for words in ("[agent] fence_after_seconds 3", "[fleet] lost_after_seconds 4", "every job at_most_once"):
        assert words in str(refused), refused
    assert db.registered_agent("vm") is None
    sample = metrics.registry.get_sample_value(
        "reconciler_agent_heartbeats_total", {"result": "fence_too_late"}
    )
    assert sample == 1
    db.dispose()


@pytest.mark.fast
def test_an_agent_fencing_too_late_registers_but_takes_no_at_most_once_job(tmp_path: Path) -> None:
    """It registers (its plain jobs are no concern of the fence); the fleet then names why an
    at_most_once job must go elsewhere, as it does for an agent that does not fence at all."""
    db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    config = FleetConfig(lost_after_seconds=4.0)
    beat = Heartbeat(url="http://x", instance="one", heartbeat_seconds=0.5, fence=TERMS)
    (accepted,) = registry_test(db, config, Metrics(), [beat])
    assert not isinstance(accepted, Refused), accepted
    stored = db.registered_agent("vm")
    assert stored is not None and (stored.fence_after_seconds, stored.fence_grace_seconds) == (3.0, 1.0)

    async def refusals() -> list[str | None]:
        pool = AgentPool([], {}, timeout=1, stop_timeout=1)
        fleet = Fleet(db=db, agents=pool, metrics=Metrics(), config=config, registered_token=Secret("fleet"))
        try:
            await fleet.load_registered()
            late = fleet.fence_refusal("vm")
            db.heartbeat_agent(replace(stored, fence_after_seconds=0.0), alive_after=db.now())
            await fleet.load_registered()
            none = fleet.fence_refusal("vm")
            db.heartbeat_agent(replace(stored, fence_grace_seconds=0.1), alive_after=db.now())
            await fleet.load_registered()
            return [late, none, fleet.fence_refusal("vm"), fleet.fence_refusal("unknown")]
        finally:
            await fleet.close()
            await pool.close()

    late, none, fits, unknown = asyncio.run(refusals())
    assert late is not None and "[fleet] lost_after_seconds 4" in late, late
    assert none is not None and "does not fence" in none, none
    assert fits is None and unknown is None  # 3 + 0.3 + 0.1 + 0.5 = 3.9 s < 4 s
    db.dispose()
