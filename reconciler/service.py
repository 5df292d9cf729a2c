"""Wires the sidecar together: router DB, Airflow client, agents, loop, HTTP server."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from reconciler.agents import AgentPool
from reconciler.airflow import AirflowClient
from reconciler.config import ReconcilerConfig, Secrets
from reconciler.fleet import AgentState, Fleet
from reconciler.leadership import Leadership
from reconciler.loop import Reconciler
from reconciler.metrics import Metrics
from reconciler.ratelimit import RateLimiter
from reconciler.server import SidecarAPI
from reconciler.stops import StopDispatcher
from router_db import RouterDB

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
    reconciler: Reconciler
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
    agents.avoid = lambda agent_id: fleet.state(agent_id) is AgentState.LOST
    reconciler = Reconciler(
        db=db,
        airflow=airflow,
        agents=agents,
        dispatcher=dispatcher,
        metrics=metrics,
        poll=config.poll,
        fleet=fleet,
    )
    return Parts(db, airflow, agents, metrics, dispatcher, reconciler, fleet)


async def serve(config: ReconcilerConfig, secrets: Secrets) -> None:
    """Run the loop and the HTTP API until SIGTERM or SIGINT, then finish in-flight stops."""
    parts = build(config, secrets)
    # Every replica serves the API; only the lease holder runs the loop (which resumes pending stops).
    leadership = Leadership(db=parts.db, metrics=parts.metrics, config=config.leader)
    api = SidecarAPI(
        db=parts.db,
        agents=parts.agents,
        metrics=parts.metrics,
        reconciler=parts.reconciler,
        dispatcher=parts.dispatcher,
        token=secrets.http_token,
        ready_after=max(10.0, 5 * config.poll.interval_seconds),
        rate_limiter=(
            RateLimiter(rate=config.http.rate_limit_per_second, burst=config.http.rate_limit_burst)
            if config.http.rate_limit_per_second > 0
            else None
        ),
        is_leader=lambda: leadership.is_leader,
    )
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    ssl_context = config.http.server_ssl_context()
    site = web.TCPSite(runner, config.http.host, config.http.port, ssl_context=ssl_context)
    await site.start()
    log.info("sidecar listening on %s://%s:%d", config.http.scheme, config.http.host, config.http.port)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await leadership.run(stopping, parts.reconciler.run)
    finally:
        log.info("shutting down: finishing %d stop(s) under way", parts.dispatcher.inflight)
        await parts.dispatcher.drain(SHUTDOWN_GRACE_SECONDS)
        await leadership.release()
        await runner.cleanup()
        await parts.close()
