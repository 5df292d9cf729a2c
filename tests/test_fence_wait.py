"""The sidecar never ends a fenced job FAILED while its agent's fence may not have stopped it yet.

In process, on a fake monotonic clock (the fast tier): a registered agent whose terms outlast
``lost_after_seconds`` (the sidecar restarted with a shorter one since the agent registered) goes
silent; its plain job ends FAILED when the agent is lost, its ``at_most_once`` jobs only once the
fence has surely fired, by the longer of the terms said at submission and now, or, where no terms
were ever said (an agent of the previous release), by that release's defaults. Such an agent
registers, but takes no job it would fence (every job, with ``at_most_once_default``), naming the keys
on both sides. The real-process partition, with Airflow, is tests/test_airflow_partition.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent_api.fencing import UNSAID, FenceTerms
from agent_api.registration import Heartbeat, identity_fingerprint
from harness.wiring import nobody_waits
from reconciler.config import FleetConfig
from reconciler.errors import Refused
from reconciler.fleet.agent_state import AgentState
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.fencing import fence_problem, fence_wait
from reconciler.fleet.liveness import Fleet
from reconciler.fleet.registry import Registry
from reconciler.metrics import Metrics
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
    assert fence_wait(TERMS.gone_after(), silent_for=2.0, margin=0.5) == pytest.approx(2.8)
    assert fence_wait(TERMS.gone_after(), silent_for=9.0, margin=0.5) == 0
    assert FenceTerms.from_json(None) is None  # an agent of the previous release says nothing
    assert UNSAID.gone_after() == pytest.approx(71)
    assert TERMS.fenced(True) and not TERMS.fenced(False) and replace(TERMS, default=True).fenced(False)
    assert not FenceTerms(grace_seconds=5, default=True).fenced(True)  # fence_after 0: fences nothing


def running(
    db: RouterDB, task_id: str, *, at_most_once: bool, fence_seconds: float | None = None
) -> JobRecord:
    key = TaskInstanceKey(dag_id="fenced", task_id=task_id, run_id="r")
    job, _ = db.submit(NewJob(key, "vm", "sleep 600", "", at_most_once, fence_seconds))
    db.mark_running(job.job_id, source="test")
    return job


class SilentAgent:
    """Registered agent vm beside the leader's fleet, on a fake clock ticking 0.5 s: it heartbeats for a
    few ticks, then falls silent; :meth:`run` says when each job ended, counted from its last heartbeat."""

    def __init__(self, tmp_path: Path, **row: Any) -> None:
        self.db = SteppedRouterDB(f"sqlite:///{tmp_path / 'router.db'}")
        self.db.create_schema()
        config = FleetConfig(lost_after_seconds=2.0, check_interval_seconds=0.5, check_timeout_seconds=0.5)
        self.ticks = [1000.0]
        self.pool = AgentPool([], {}, timeout=1, stop_timeout=1)
        self.metrics = Metrics()
        self.fleet = Fleet(db=self.db, agents=self.pool, metrics=self.metrics, config=config,
                           clock=lambda: self.ticks[0], registered_token=Secret("t"),
                           changed=nobody_waits)  # fmt: skip
        self.waiting: list[float | None] = []  # reconciler_fence_waiting_jobs after each tick
        now = self.db.now()
        self.record = AgentRecord(
            agent_id="vm", url="http://127.0.0.1:9", labels=(), max_jobs=0, jobs_running=0, version="",
            draining=False, instance="one", registered_at=now, last_heartbeat_at=now, heartbeat_seconds=0.5,
            **row,
        )  # fmt: skip

    def run(self, jobs: list[JobRecord], *, seconds: float, beats: int) -> dict[str, float]:
        db, ended = self.db, {}

        async def scenario() -> None:
            silent_since = 0.0
            try:
                for step in range(int(seconds / 0.5)):
                    self.ticks[0] += 0.5
                    db.step += 0.5
                    if step < beats:
                        db.heartbeat_agent(
                            replace(self.record, last_heartbeat_at=db.now()), alive_after=db.now()
                        )
                        silent_since = self.ticks[0]
                    await self.fleet.load_registered()
                    await self.fleet.tick()
                    self.waiting.append(
                        self.metrics.registry.get_sample_value("reconciler_fence_waiting_jobs")
                    )
                    for job in jobs:
                        found = db.get(job.job_id)
                        if found is not None and not found.active and job.job_id not in ended:
                            ended[job.job_id] = self.ticks[0] - silent_since
            finally:
                await self.fleet.close()
                await self.pool.close()

        asyncio.run(scenario())
        return ended


@pytest.mark.fast
def test_a_lost_agents_fenced_job_ends_failed_only_once_its_fence_has_surely_fired(tmp_path: Path) -> None:
    vm = SilentAgent(
        tmp_path, fence_after_seconds=TERMS.after_seconds, fence_grace_seconds=TERMS.grace_seconds
    )
    db, metrics, waiting = vm.db, vm.metrics, vm.waiting
    plain = running(db, "plain", at_most_once=False)
    fenced = running(db, "fenced", at_most_once=True)
    recorded = running(db, "recorded", at_most_once=True, fence_seconds=8.0)  # its terms when submitted
    ended = vm.run([plain, fenced, recorded], seconds=20, beats=4)
    assert vm.fleet.state("vm") is AgentState.LOST
    assert set(ended) == {plain.job_id, fenced.job_id, recorded.job_id}, ended
    assert 2.0 <= ended[plain.job_id] <= 3.0, ended  # lost_after_seconds, as ever
    assert 4.8 <= ended[fenced.job_id] <= 5.5, ended  # its fence (4.3 s) and one heartbeat (0.5 s)
    assert 8.5 <= ended[recorded.job_id] <= 9.5, ended  # the longer terms, said when it was submitted
    plain_now, fenced_now = db.get(plain.job_id), db.get(fenced.job_id)
    assert plain_now is not None and fenced_now is not None
    assert plain_now.status is JobStatus.FAILED and "fenced" not in (plain_now.reason or "")
    assert fenced_now.status is JobStatus.FAILED and fenced_now.at_most_once
    assert "agent vm lost" in (fenced_now.reason or "") and "fence_after_seconds=3" in (
        fenced_now.reason or ""
    )
    # While its fence may still run, the job is counted as waiting; then as fenced.
    assert max(w or 0 for w in waiting) == 2 and waiting[-1] == 0, waiting
    assert metrics.registry.get_sample_value("reconciler_fenced_jobs_total") == 2
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
def test_a_job_recorded_unfenced_on_an_agent_that_fences_every_job_waits_for_the_fence(
    tmp_path: Path,
) -> None:
    """A replica that did not know the agent's terms at submission (a standby) recorded only what was
    asked; the agent fences every job all the same (at_most_once_default), so its FAILED waits."""
    vm = SilentAgent(
        tmp_path,
        fence_after_seconds=TERMS.after_seconds,
        fence_grace_seconds=TERMS.grace_seconds,
        at_most_once_default=True,
    )
    unasked = running(vm.db, "unasked", at_most_once=False)
    ended = vm.run([unasked], seconds=20, beats=2)
    assert ended[unasked.job_id] >= 4.3, ended  # its fence (4.3 s), not lost_after_seconds (2 s)
    vm.db.dispose()


@pytest.mark.fast
def test_an_agent_of_the_previous_release_is_waited_for_as_its_defaults_fence(tmp_path: Path) -> None:
    """It said no terms: its at_most_once job ends FAILED once 60 s fence, 1 s check and 10 s grace (and
    one heartbeat) have passed since its last heartbeat, not at lost_after_seconds."""
    vm = SilentAgent(tmp_path)
    fenced = running(vm.db, "old", at_most_once=True)
    ended = vm.run([fenced], seconds=100, beats=2)
    # 71 s and one heartbeat from the last heartbeat, which the stepped router DB's clock dates up to
    # one tick (0.5 s) before this loop's count of it.
    assert 71.0 <= ended[fenced.job_id] <= 72.5, ended
    vm.db.dispose()


@pytest.mark.fast
def test_an_agent_fencing_too_late_registers_but_takes_no_job_it_would_fence(tmp_path: Path) -> None:
    """It registers (refusing would leave its old terms behind); the fleet then names why a job it
    would fence must go elsewhere (every job, for one that makes every job at_most_once), as it does
    for an at_most_once job on an agent that does not fence at all."""
    db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    config = FleetConfig(lost_after_seconds=4.0)
    beat = Heartbeat(
        url="http://x", instance="one", heartbeat_seconds=0.5, fence=replace(TERMS, default=True)
    )
    (accepted,) = registry_test(db, config, Metrics(), [beat])
    assert not isinstance(accepted, Refused), accepted
    stored = db.registered_agent("vm")
    assert stored is not None and (stored.fence_after_seconds, stored.fence_grace_seconds) == (3.0, 1.0)

    async def refusals() -> dict[str, str | None]:
        pool = AgentPool([], {}, timeout=1, stop_timeout=1)
        fleet = Fleet(
            db=db,
            agents=pool,
            metrics=Metrics(),
            config=config,
            registered_token=Secret("fleet"),
            changed=nobody_waits,
        )
        said: dict[str, str | None] = {}

        async def beat(**changes: Any) -> None:
            db.heartbeat_agent(replace(stored, **changes), alive_after=db.now())
            await fleet.load_registered()

        try:
            await fleet.load_registered()
            said["plain, every job fenced"] = fleet.fence_refusal("vm", at_most_once=False)
            said["asked, every job fenced"] = fleet.fence_refusal("vm", at_most_once=True)
            await beat(at_most_once_default=False)
            said["plain"] = fleet.fence_refusal("vm", at_most_once=False)
            said["asked"] = fleet.fence_refusal("vm", at_most_once=True)
            await beat(fence_after_seconds=0.0, at_most_once_default=False)
            said["asked, no fence"] = fleet.fence_refusal("vm", at_most_once=True)
            await beat(fence_grace_seconds=0.1, at_most_once_default=False)
            said["asked, fits"] = fleet.fence_refusal("vm", at_most_once=True)  # 3 + 0.3 + 0.1 + 0.5 < 4
            await beat(fence_after_seconds=None, fence_grace_seconds=None, at_most_once_default=False)
            said["asked, not said"] = fleet.fence_refusal("vm", at_most_once=True)  # it refuses if it must
            said["unknown agent"] = fleet.fence_refusal("unknown", at_most_once=True)
            return said
        finally:
            await fleet.close()
            await pool.close()

    said = asyncio.run(refusals())
    for case in ("plain, every job fenced", "asked, every job fenced", "asked"):
        assert said[case] is not None and "[fleet] lost_after_seconds 4" in said[case], (case, said)
    assert said["asked, no fence"] is not None and "does not fence" in said["asked, no fence"], said
    for case in ("plain", "asked, fits", "asked, not said", "unknown agent"):
        assert said[case] is None, (case, said)
    db.dispose()
