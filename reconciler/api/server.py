"""The sidecar's HTTP API, routes only: the router API (jobs), metrics and health.

Requests are parsed with :mod:`sidecar_api.protocol`, carried out by :class:`JobService`, and answered
in the shapes that module defines. Auth, JSON errors and body limits are :mod:`servicekit.http`'s, the
same as the agent's: a token on everything but ``/metrics``, ``/healthz`` and ``/readyz`` (any of the
configured tokens: rotation; those of a token file as the file is now), with a per-client rate limit
when configured (429 with ``Retry-After``).
Bad input gets a 4xx JSON ``{"error": ...}`` naming the problem and changes nothing. Text no router DB
can store (NUL: PostgreSQL refuses it where SQLite keeps it; a lone surrogate) is refused wherever it
is, in any body string or key and in query parameters, before any field is looked at.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from agent_api.maintenance import DrainRequest
from agent_api.protocol import ProtocolError
from agent_api.registration import (
    CREDENTIAL_HEADER,
    IDENTITY_PROOF_PATTERN,
    parse_heartbeat,
    validate_agent_id,
)
from reconciler.api.pages import PageConfig, add_pages, except_pages
from reconciler.api.readiness import assess
from reconciler.api.statuses import status_of
from reconciler.core.job_service import JobService, Update
from reconciler.core.loop import ReconcileLoop
from reconciler.errors import Refused
from reconciler.fleet.agent_state import AgentReport
from reconciler.fleet.liveness import Fleet
from reconciler.fleet.registry import Registry
from reconciler.metrics import Metrics
from router_db import RouterDB
from servicekit.credentials import Secret
from servicekit.http import (
    BadRequest,
    HttpError,
    carries_token,
    error_response,
    json_errors,
    query_flag,
    query_int,
    query_text,
    read_json,
    token_auth,
)
from servicekit.ratelimit import RateLimiter
from sidecar_api.protocol import (
    DEFAULT_LIST_LIMIT,
    MAX_INT,
    MAX_LIST_LIMIT,
    WireError,
    agent_json,
    job_json,
    parse_status,
    parse_submit,
    parse_update,
    parse_wait,
    submit_json,
    update_json,
    validate_job_id,
    validate_name,
)

OPEN_PATHS = ("/metrics", "/healthz", "/readyz")
REGISTRATION_ROUTE = "/agents/{agent_id}"
_BOOTSTRAP = web.RequestKey("bootstrap", bool)  # the registration carried the fleet token


def _known(exc: Exception) -> HttpError | None:
    if isinstance(exc, WireError | ProtocolError):  # ProtocolError: an agent's registration
        return BadRequest(str(exc))
    if isinstance(exc, Refused):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return HttpError(status_of(exc), str(exc), headers=headers)
    return None


class SidecarAPI:
    def __init__(
        self,
        *,
        jobs: JobService,
        db: RouterDB,
        metrics: Metrics,
        loop: ReconcileLoop,
        tokens: Sequence[str] | Secret[tuple[str, ...]],
        ready_after: float,
        max_body_bytes: int = 1024 * 1024,
        rate_limiter: RateLimiter | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        fleet: Fleet | None = None,
        pages: PageConfig | None = None,  # serve the read-only pages under /ui/ too
        registry: Registry | None = None,  # agents may register (PUT /agents/{id}) with these tokens
        fleet_tokens: Secret[tuple[str, ...]] | None = None,
    ) -> None:
        self._jobs = jobs
        self._fleet = fleet
        self._db = db
        self._metrics = metrics
        self._loop = loop
        self._tokens = tokens if isinstance(tokens, Secret) else Secret(tuple(tokens))
        self._limiter = rate_limiter
        self._is_leader = is_leader
        self._max_body_bytes = max_body_bytes
        self._ready_after = ready_after  # seconds without a successful cycle before /readyz fails
        self._pages = pages
        self._registry = registry
        self._fleet_tokens = fleet_tokens

    def app(self) -> web.Application:
        middlewares = [
            json_errors(service="sidecar", known=_known),
            # The pages check their own login: a session cookie, or the same bearer tokens.
            except_pages(
                _registration_apart(
                    token_auth(self._tokens, open_paths=OPEN_PATHS, limiter=self._limiter),
                    # Agents share the fleet token: one rate-limit bucket would throttle the fleet.
                    self._fleet_tokens,
                )
            ),
        ]
        # client_max_size is not our limit (read_json applies max_body_bytes); keep aiohttp's out of the way
        app = web.Application(client_max_size=self._max_body_bytes + 1, middlewares=middlewares)
        app.router.add_post("/jobs", self.submit)
        app.router.add_post("/jobs/update_status", self.update_status)
        app.router.add_get("/jobs", self.list_jobs)
        app.router.add_get("/jobs/{job_id}", self.get_job)
        app.on_shutdown.append(self._end_long_polls)  # before aiohttp waits for requests in flight
        app.router.add_get("/jobs/{job_id}/log", self.job_log)
        app.router.add_get("/jobs/{job_id}/events", self.job_events)
        app.router.add_get("/agents", self.list_agents)
        app.router.add_put("/agents/{agent_id}", self.register_agent)  # REGISTRATION_ROUTE
        app.router.add_delete("/agents/{agent_id}", self.forget_agent)
        app.router.add_post("/agents/{agent_id}/revoke", self.revoke_agent)
        app.router.add_post("/agents/{agent_id}/drain", self.drain_agent)
        app.router.add_post("/agents/{agent_id}/undrain", self.undrain_agent)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if self._pages is not None:
            add_pages(
                app,
                self._pages,
                jobs=self._jobs,
                db=self._db,
                fleet=self._fleet,
                tokens=self._tokens,
                limiter=self._limiter,
            )
        return app

    async def submit(self, request: web.Request) -> web.Response:
        submitted = await self._jobs.submit(
            parse_submit(await read_json(request, limit=self._max_body_bytes))
        )
        return web.json_response(
            submit_json(submitted.job, created=submitted.created), status=201 if submitted.created else 200
        )

    async def update_status(self, request: web.Request) -> web.Response:
        """The push endpoint; see :meth:`JobService.update_status`."""
        done: Update = await self._jobs.update_status(
            parse_update(await read_json(request, limit=self._max_body_bytes))
        )
        answer = update_json(
            ok=done.ok, message=done.message, action=done.action, job=done.job, previous=done.previous
        )
        return web.json_response(answer, status=done.code)

    async def get_job(self, request: web.Request) -> web.Response:
        """The job from the router DB; with ``wait`` (seconds), once its status differs from
        ``status`` (default: its status now) or it has ended, or when ``wait`` has passed."""
        job_id = _job_id(request)
        wait = parse_wait(query_text(request, "wait"))
        status = query_text(request, "status")
        known = parse_status(status) if status is not None else None
        job = await self._jobs.job(job_id, wait=wait, known=known)
        return web.json_response(job_json(job))

    async def _end_long_polls(self, app: web.Application) -> None:
        self._jobs.close()

    async def list_jobs(self, request: web.Request) -> web.Response:
        """Jobs matching every filter given; a filter left out matches everything."""
        names = ("dag_id", "run_id", "status", "agent_id", "since")
        dag_id, run_id, status, agent_id, since = (query_text(request, name) for name in names)
        for name, value in (("dag_id", dag_id), ("run_id", run_id), ("agent_id", agent_id)):
            if value is not None:
                validate_name(name, value)
        limit = query_int(request, "limit", low=1, high=MAX_INT) or DEFAULT_LIST_LIMIT
        jobs = await self._jobs.search(
            dag_id=dag_id,
            run_id=run_id,
            statuses=[parse_status(status)] if status is not None else None,
            agent_id=agent_id,
            since=_moment("since", since) if since is not None else None,
            limit=min(limit, MAX_LIST_LIMIT),
            newest_first=query_flag(request, "newest_first"),
        )
        return web.json_response({"jobs": [job_json(j) for j in jobs]})

    async def job_events(self, request: web.Request) -> web.Response:
        """The job's audit trail: every status change with its time, source and reason."""
        job, events = await self._jobs.events(_job_id(request))
        return web.json_response(
            {
                "job_id": job.job_id,
                "events": [
                    {
                        "at": e.at.isoformat(),
                        "old_status": e.old_status,
                        "new_status": e.new_status,
                        "source": e.source,
                        "reason": e.reason,
                    }
                    for e in events
                ],
            }
        )

    async def job_log(self, request: web.Request) -> web.Response:
        job = await self._jobs.recorded(_job_id(request))  # an unknown job is a 404 whatever the query
        # As many digits as the agent takes: a log may outgrow any 32-bit offset.
        offset = query_int(request, "offset", low=0) or 0
        limit = query_int(request, "limit", low=1)
        cursor = query_flag(request, "cursor")
        chunk = await self._jobs.log(job, offset=offset, limit=limit, cursor=cursor)
        return web.Response(
            body=chunk.data,
            content_type="text/plain",
            headers={"X-Log-Size": str(chunk.size), "X-Next-Offset": str(chunk.next_offset)},
        )

    async def register_agent(self, request: web.Request) -> web.Response:
        """An agent's registration or heartbeat (:mod:`reconciler.fleet.registry`)."""
        agent_id = validate_agent_id(request.match_info["agent_id"])
        if self._registry is None:
            raise HttpError(
                404, "agent registration is off on this sidecar: set [fleet] registration_token_env or _file"
            )
        beat = parse_heartbeat(await read_json(request, limit=self._max_body_bytes))
        accepted = await self._registry.heartbeat(
            agent_id,
            beat,
            credential=request.headers.get(CREDENTIAL_HEADER, ""),
            bootstrap=request.get(_BOOTSTRAP, False),
        )
        return web.json_response(
            {
                "agent_id": accepted.record.agent_id,
                "registered_at": accepted.record.registered_at.isoformat(),
                "lost_after_seconds": self._registry.lost_after_seconds,
                "renew_credential": accepted.renew_credential,
                "credential_renewed": accepted.credential_renewed,
            }
        )

    async def revoke_agent(self, request: web.Request) -> web.Response:
        """End a registered agent's credential: its heartbeats, and its id's registrations, are refused
        until it is forgotten; no new job goes to it, and the lost rule ends its jobs."""
        registry = self._registry_on()
        record = await registry.revoke(_known_agent_id(request))
        return web.json_response(
            {"agent_id": record.agent_id, "revoked_at": _iso(record.revoked_at), "url": record.url}
        )

    async def forget_agent(self, request: web.Request) -> web.Response:
        """Remove a registered agent that is revoked, or lost, and holds no active job: its id may
        register again."""
        registry = self._registry_on()
        agent_id = _known_agent_id(request)
        await registry.forget(agent_id)
        if self._fleet is not None:
            await self._fleet.load_registered()
        return web.json_response({"agent_id": agent_id, "forgotten": True})

    def _registry_on(self) -> Registry:
        if self._registry is None:
            raise HttpError(
                404, "agent registration is off on this sidecar: set [fleet] registration_token_env or _file"
            )
        return self._registry

    async def list_agents(self, request: web.Request) -> web.Response:
        """The agents in id order, configured and registered: state, capacity and load (see
        :func:`agent_json`)."""
        if self._fleet is not None:
            await self._fleet.load_registered()  # a standby's fleet does not tick: read them now
        ids = self._fleet.ids() if self._fleet is not None else []
        load = await asyncio.to_thread(self._db.active_counts) if ids else {}
        reports = [self._fleet.report(a) for a in ids] if self._fleet is not None else []
        return web.json_response({"agents": [_agent(report, load) for report in reports]})

    async def drain_agent(self, request: web.Request) -> web.Response:
        """No new job goes to the agent (its running jobs run on); 502 if the agent did not take the
        flag, which the sidecar keeps all the same."""
        return await self._drain(request, draining=True)

    async def undrain_agent(self, request: web.Request) -> web.Response:
        return await self._drain(request, draining=False)

    async def _drain(self, request: web.Request, *, draining: bool) -> web.Response:
        # A body is optional (as the agent's /drain): a comment, who asks, a timeout; anything but an
        # object, or a field of the wrong shape, is a client's mistake, refused before anything changes.
        body = await read_json(request, limit=self._max_body_bytes, allow_empty=True)
        try:
            asked = DrainRequest.from_json(body)
        except ProtocolError as exc:
            raise BadRequest(str(exc)) from None
        if not draining and (asked.comment or asked.timeout_seconds is not None):
            raise BadRequest("an undrain takes no comment and no timeout")
        asked = replace(asked, by=asked.by or "the sidecar's API")
        agent_id = request.match_info["agent_id"]
        if self._fleet is not None and agent_id not in self._fleet.ids():
            await self._fleet.load_registered()
        if self._fleet is None or agent_id not in self._fleet.ids():
            raise HttpError(404, f"unknown agent {agent_id[:128]!r}")
        report = await self._fleet.drain(agent_id, draining=draining, request=asked)
        load = await asyncio.to_thread(self._db.active_counts)
        return web.json_response(_agent(report, load))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(self._db.ping)
            db_error = None
        except Exception as exc:
            db_error = type(exc).__name__
        last = self._loop.last_success
        readiness = assess(
            leader=self._is_leader(),
            db_error=db_error,
            since_last_cycle=None if last is None else time.monotonic() - last,
            ready_after=self._ready_after,
            full_read_error=self._loop.read.failing,
            agent_states={} if self._fleet is None else {a: str(s) for a, s in self._fleet.states().items()},
        )
        return web.json_response(readiness.to_json(), status=200 if readiness.ready else 503)


def _registration_apart(api: Middleware, fleet: Secret[tuple[str, ...]] | None) -> Middleware:
    """``api`` for every route but an agent's registration. That takes a fleet token (a bootstrap), or
    an agent's credential alone (``X-Agent-Credential``, checked by the registry against the agent's
    row), whatever else the request carries: an agent whose fleet token was rotated away, or a
    sidecar without one, still hears registered agents. An operator's token registers no agent, and
    a fleet token submits no job."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if request.method != "PUT" or resource is None or resource.canonical != REGISTRATION_ROUTE:
            return await api(request, handler)
        if carries_token(request, fleet):
            request[_BOOTSTRAP] = True
            return await handler(request)
        credential = request.headers.get(CREDENTIAL_HEADER)
        if credential is not None:
            if IDENTITY_PROOF_PATTERN.fullmatch(credential) is None:  # never its value
                return error_response(401, f"{CREDENTIAL_HEADER} must be 64 lowercase hexadecimal digits")
            request[_BOOTSTRAP] = False
            return await handler(request)
        if fleet is None:
            return error_response(
                404,
                "agent registration is off on this sidecar: set [fleet] registration_token_env or _file "
                "(agents registered already speak with their own credentials)",
            )
        return error_response(
            401,
            "missing or wrong token: the fleet token (Authorization: Bearer <token>) or the agent's "
            f"credential ({CREDENTIAL_HEADER})",
        )

    return middleware


def _agent(report: AgentReport, load: dict[str, int]) -> dict[str, object]:
    return agent_json(
        agent_id=report.agent_id,
        url=report.url,
        labels=report.labels,
        state=str(report.state),
        last_contact_at=report.last_contact_at,
        max_jobs=report.max_jobs,
        active_jobs=load.get(report.agent_id, 0),
        jobs_running=report.jobs_running,
        version=report.version,
        draining=report.draining,
        registered=report.registered,
        maintenance=report.maintenance.to_json() if report.maintenance is not None else None,
    )


def _known_agent_id(request: web.Request) -> str:
    """The path's agent id; one no agent can have is no registered agent (404), as for drain."""
    agent_id = request.match_info["agent_id"]
    try:
        return validate_agent_id(agent_id)
    except ProtocolError:
        raise HttpError(404, f"no registered agent {agent_id[:128]!r}") from None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _moment(name: str, text: str) -> datetime:
    """An ISO-8601 time with its UTC offset (``2026-12-05T12:00:00+00:00`` or ``...Z``)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name} must be an ISO-8601 time with a UTC offset, e.g. 2026-12-05T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise BadRequest(f"{name} must carry a UTC offset (Z or +00:00)")
    return moment


def _job_id(request: web.Request) -> str:
    return validate_job_id(request.match_info["job_id"])
