"""Wires the sidecar together: router DB, Airflow client, agents, loop, HTTP server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from reconciler.agents import AgentPool
from reconciler.airflow import AirflowClient
from reconciler.config import ReconcilerConfig, Secrets
from reconciler.fleet import AgentState, Fleet
from reconciler.job_service import JobService
from reconciler.leadership import Leadership
from reconciler.loop import ReconcileLoop
from reconciler.metrics import Metrics
from reconciler.pages import PageConfig
from reconciler.retention import prune_periodically
from reconciler.server import SidecarAPI
from reconciler.stops import StopDispatcher
from router_db import RouterDB
from servicekit.credentials import follow
from servicekit.ratelimit import RateLimiter
from servicekit.serve import serving, shutdown_requested

log = logging.getLogger("reconciler")

SHUTDOWN_GRACE_SECONDS = 30.0  # in-flight stops get this long to finish on SIGTERM
AGENT_READ_TIMEOUT_SECONDS = 10.0  # run, status and log calls; stops use [stop] timeout_seconds


@dataclass
class Parts:
    db: RouterDB
    airflow: AirflowClient
    agents: AgentPool
    metrics: Metrics
    dispatcher: StopDispatcher
    loop: ReconcileLoop
    fleet: Fleet

    async def close(self) -> None:
        await self.fleet.close()
        await self.airflow.close()
        await self.agents.close()
        self.db.dispose()


def build(config: ReconcilerConfig, secrets: Secrets, *, create_schema: bool = True) -> Parts:
    db = RouterDB(config.router_db.url)
    if create_schema:
        db.create_schema()
    metrics = Metrics()
    airflow = AirflowClient(
        config.airflow.base_url,
        api_version=config.airflow.api_version,  # type: ignore[arg-type]  # validated by the config
        username=config.airflow.username,
        password=secrets.airflow_password,
        timeout=config.airflow.timeout_seconds,
        on_response=lambda code: metrics.airflow_requests.labels(code).inc(),
    )
    agents = AgentPool(
        config.agents,
        secrets.agent_tokens,
        timeout=AGENT_READ_TIMEOUT_SECONDS,
        stop_timeout=config.stop.timeout_seconds,
    )
    dispatcher = StopDispatcher(db, agents, metrics, config.stop)
    fleet = Fleet(db=db, agents=agents, metrics=metrics, config=config.fleet)
    agents.avoid = lambda agent_id: fleet.state(agent_id) in (AgentState.LOST, AgentState.WRONG_IDENTITY)
    agents.refuse = fleet.refusal
    agents.capacity = fleet.capacity
    loop = ReconcileLoop(
        db=db,
        airflow=airflow,
        agents=agents,
        dispatcher=dispatcher,
        metrics=metrics,
        poll=config.poll,
        fleet=fleet,
    )
    return Parts(db, airflow, agents, metrics, dispatcher, loop, fleet)


async def _lead(parts: Parts, config: ReconcilerConfig, term: asyncio.Event) -> None:
    """What the leader runs for its term: the poll loop, and retention beside it."""
    pruning = asyncio.create_task(
        prune_periodically(
            parts.db,
            keep_days=config.retention.keep_days,
            stopping=term,
            every=config.retention.check_seconds,
        )
    )
    try:
        await parts.loop.run(term)
    finally:
        pruning.cancel()
        await asyncio.gather(pruning, return_exceptions=True)


async def serve(config: ReconcilerConfig, secrets: Secrets) -> None:
    """Run the loop and the HTTP API until SIGTERM or SIGINT, then finish in-flight stops."""
    parts = build(config, secrets)
    # Every replica serves the API; only the lease holder runs the loop (which resumes pending stops).
    leadership = Leadership(db=parts.db, metrics=parts.metrics, config=config.leader)
    api = SidecarAPI(
        jobs=JobService(
            db=parts.db,
            agents=parts.agents,
            loop=parts.loop,
            dispatcher=parts.dispatcher,
            when_full=config.fleet.when_full,
            metrics=parts.metrics,
        ),
        db=parts.db,
        metrics=parts.metrics,
        loop=parts.loop,
        tokens=secrets.http_tokens,
        ready_after=max(10.0, 5 * config.poll.interval_seconds),
        max_body_bytes=config.http.max_body_bytes,
        rate_limiter=(
            RateLimiter(rate=config.http.rate_limit_per_second, burst=config.http.rate_limit_burst)
            if config.http.rate_limit_per_second > 0
            else None
        ),
        is_leader=lambda: leadership.is_leader,
        pages=PageConfig(
            airflow_url=config.airflow.base_url,
            airflow_version=parts.airflow.api_version,
            viewer_tokens=secrets.viewer_tokens,
            secure=config.http.scheme == "https",
        ),
    )
    stopping = shutdown_requested()
    # Every replica, standby too, serves the API with the tokens as their files say now.
    viewers = [secrets.viewer_tokens] if secrets.viewer_tokens is not None else []
    watcher = asyncio.create_task(follow([secrets.http_tokens, *viewers, *secrets.agent_tokens.values()]))
    http = config.http
    try:
        async with serving(api.app(), host=http.host, port=http.port, ssl_context=http.server_ssl_context()):
            log.info("sidecar listening on %s://%s:%d", http.scheme, http.host, http.port)
            try:
                await leadership.run(stopping, lambda term: _lead(parts, config, term))
            finally:
                log.info("shutting down: finishing %d stop(s) under way", parts.dispatcher.inflight)
                try:
                    await parts.dispatcher.drain(SHUTDOWN_GRACE_SECONDS)  # a second signal cuts it short
                finally:
                    await leadership.release()  # a standby takes over at once either way
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await parts.close()
