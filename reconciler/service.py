"""Wires the sidecar together: router DB, Airflow client, agents, loop, HTTP server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from reconciler.airflow.client import AirflowClient
from reconciler.api.pages import PageConfig
from reconciler.api.server import SidecarAPI
from reconciler.config import ReconcilerConfig, Secrets
from reconciler.core.job_service import JobService
from reconciler.core.leadership import Identity, Leadership, claim_identity
from reconciler.core.loop import ReconcileLoop
from reconciler.core.outcome import start_grace
from reconciler.core.parts import Core, build_core
from reconciler.core.retention import prune_periodically
from reconciler.core.stops import StopDispatcher
from reconciler.core.submissions import Submissions
from reconciler.core.watch import JobWatch
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.liveness import Fleet
from reconciler.fleet.registry import Registry
from reconciler.metrics import Metrics
from router_db import RouterDB, schema
from servicekit.credentials import Secret, View, follow
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
    core: Core
    fleet: Fleet
    submissions: Submissions

    @property
    def loop(self) -> ReconcileLoop:
        return self.core.loop

    def job_service(self, *, when_full: str = "wait") -> JobService:
        """The router API's jobs, over these parts (``when_full``: ``[fleet] when_full``)."""
        return JobService(
            db=self.db,
            agents=self.agents,
            fleet=self.fleet,
            confirmer=self.core.confirmer,
            sync=self.core.sync,
            watch=self.core.watch,
            dispatcher=self.dispatcher,
            when_full=when_full,
            metrics=self.metrics,
            submissions=self.submissions,
        )

    async def close(self) -> None:
        await self.fleet.close()
        await self.airflow.close()
        await self.agents.close()
        self.db.dispose()


def build(config: ReconcilerConfig, secrets: Secrets, *, dry_run: bool = False) -> Parts:
    """The sidecar's parts, on a router DB at this version's schema: an empty one is created, an older
    one migrated only with ``[router_db] upgrade_on_start``, any other refused (:class:`SchemaRefused`).
    ``dry_run``: the schema is checked, never created nor migrated."""
    db = RouterDB(config.router_db.url)
    try:
        schema.prepare_for_start(
            db.engine,
            upgrade_on_start=config.router_db.upgrade_on_start and not dry_run,
            may_create=not dry_run,
        )
    except BaseException:
        db.dispose()
        raise
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
    # A stop's outcome, or a lost agent's job ended, wakes the trigger long-polling that job at once.
    watch = JobWatch(db, period=config.poll.watch_seconds)
    dispatcher = StopDispatcher(db, agents, metrics, config.stop, changed=watch.notify)
    fleet = Fleet(  # it guards the pool: lost agents avoided, another agent at a URL refused
        db=db,
        agents=agents,
        metrics=metrics,
        config=config.fleet,
        changed=watch.notify,
        registered_token=_sent_token(secrets),
    )
    core = build_core(
        db=db,
        airflow=airflow,
        agents=agents,
        dispatcher=dispatcher,
        metrics=metrics,
        poll=config.poll,
        fleet=fleet,
        watch=watch,
        unaddressable_grace_seconds=config.fleet.lost_after_seconds,
        start_grace_seconds=start_grace(
            give_up_seconds=config.fleet.submit_give_up_seconds, run_timeout=AGENT_READ_TIMEOUT_SECONDS
        ),
    )
    submissions = Submissions(
        db=db,
        agents=agents,
        give_up_seconds=config.fleet.submit_give_up_seconds,
        lost_after_seconds=config.fleet.lost_after_seconds,
        run_timeout=AGENT_READ_TIMEOUT_SECONDS,
        answering=core.sync.answering,
        notify=core.watch.notify,
    )
    return Parts(db, airflow, agents, metrics, dispatcher, core, fleet, submissions)


def _sent_token(secrets: Secrets) -> Secret[str]:
    """What registered agents older than credentials are called with: the fleet token, as its file
    says now (the first of its tokens). Without one, registered agents are still read and called
    (with their own call tokens): registration is off for new agents only."""
    if secrets.fleet_tokens is None:
        return Secret("", what="[fleet] registration token (none)")
    return View("[fleet] registration token", [secrets.fleet_tokens], lambda tokens: tokens[0])


async def _lead(parts: Parts, config: ReconcilerConfig, term: asyncio.Event) -> None:
    """What the leader runs for its term: the poll loop, and retention and the sweep of submissions
    nobody follows (their replica died) beside it."""
    pruning = asyncio.create_task(
        prune_periodically(
            parts.db,
            keep_days=config.retention.keep_days,
            stopping=term,
            every=config.retention.check_seconds,
        )
    )
    sweeping = asyncio.create_task(parts.submissions.sweep_periodically(term))
    try:
        await parts.loop.run(term)
    finally:
        pruning.cancel()
        sweeping.cancel()
        await asyncio.gather(pruning, sweeping, return_exceptions=True)


async def serve(config: ReconcilerConfig, secrets: Secrets) -> None:
    """Run the loop and the HTTP API until SIGTERM or SIGINT, then finish in-flight stops."""
    # First: a replica id a live process holds stops the start (ConfigError) before anything opens.
    identity = claim_identity(config.leader, config.router_db.url)
    try:
        await _serve(config, secrets, identity)
    finally:
        identity.close()  # only now may another process take this replica's identity, and its lease


async def _serve(config: ReconcilerConfig, secrets: Secrets, identity: Identity) -> None:
    parts = build(config, secrets)
    # Every replica serves the API; only the lease holder runs the loop (which resumes pending stops).
    leadership = Leadership(
        db=parts.db,
        metrics=parts.metrics,
        config=config.leader,
        holder=identity.holder,
        successor_of=identity.successor_of,
    )
    jobs = parts.job_service(when_full=config.fleet.when_full)
    sent = parts.fleet.registered_token  # the one the fleet sends: the registry's call-back uses it too
    assert sent is not None
    # Always: registered agents keep heartbeating with their credentials when no fleet token is set.
    registry = Registry(
        db=parts.db,
        token=sent,
        static_ids=[a.id for a in config.agents],
        config=config.fleet,
        metrics=parts.metrics,
        record_jobs=jobs.apply_agent_reports,
        bootstraps=secrets.fleet_tokens is not None,
    )
    api = SidecarAPI(
        jobs=jobs,
        db=parts.db,
        metrics=parts.metrics,
        loop=parts.loop,
        fleet=parts.fleet,
        tokens=secrets.http_tokens,
        ready_after=max(10.0, 5 * config.poll.interval_seconds),
        max_body_bytes=config.http.max_body_bytes,
        rate_limiter=(
            RateLimiter(rate=config.http.rate_limit_per_second, burst=config.http.rate_limit_burst)
            if config.http.rate_limit_per_second > 0
            else None
        ),
        is_leader=lambda: leadership.is_leader,
        registry=registry,
        fleet_tokens=secrets.fleet_tokens,
        pages=PageConfig(
            airflow_url=config.airflow.base_url,
            airflow_version=parts.airflow.api_version,
            viewer_tokens=secrets.viewer_tokens,
            secure=config.http.scheme == "https" or config.http.cookie_secure,
        ),
    )
    stopping = shutdown_requested()
    registered = asyncio.create_task(parts.fleet.follow_registered(stopping))
    # Every replica, standby too, serves the API with the tokens as their files say now.
    optional = [t for t in (secrets.viewer_tokens, secrets.fleet_tokens) if t is not None]
    watcher = asyncio.create_task(follow([secrets.http_tokens, *optional, *secrets.agent_tokens.values()]))
    http = config.http
    try:
        async with serving(api.app(), host=http.host, port=http.port, ssl_context=http.server_ssl_context()):
            log.info("sidecar listening on %s://%s:%d", http.scheme, http.host, http.port)
            try:
                await leadership.run(stopping, lambda term: _lead(parts, config, term))
            finally:
                log.info("shutting down: finishing %d stop(s) under way", parts.dispatcher.inflight)
                try:
                    await parts.dispatcher.finish(SHUTDOWN_GRACE_SECONDS)  # a second signal cuts it short
                finally:
                    await leadership.release()  # a standby takes over at once either way
    finally:
        watcher.cancel()
        registered.cancel()
        await asyncio.gather(watcher, registered, return_exceptions=True)
        if registry is not None:
            await registry.close()
        await parts.close()
