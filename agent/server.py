"""The agent's HTTP API (aiohttp), a thin layer over :class:`agent.jobs.JobManager`.

Routes (JSON in and out unless noted):

- ``POST /run`` ``{"job_id", "payload": {"command", "cwd", "env", "run_as", "timeout_seconds",
  "at_most_once"}}``
  -> 201 with the job (``job_id, status, pid, rc, started_at, finished_at, reason``); 409 if the id exists.
  ``command`` runs as ``/bin/sh -c command``; ``cwd`` (absolute, must exist) defaults to the agent's
  working directory, or to the home of ``run_as`` (``/`` if it has none); ``env`` is merged over the
  agent's environment (minus the agent's own ``AGENTIC_AGENT_*`` variables and token); ``run_as``
  needs an agent running as root; ``timeout_seconds`` stops the job (SIGTERM, grace, SIGKILL) with a
  reason saying so; ``at_most_once`` (true, or ``[agent] at_most_once_default``): the agent stops it
  once cut off from the sidecar (:mod:`agent.fence`), and refuses it while cut off (503) or when it
  does not fence (400).
  What this machine cannot use is refused (400, the message starts with the field; see
  :mod:`agent.run_checks`): a ``cwd`` that is not a directory the job's user may enter (the operating
  system's words say why: ``payload.cwd: cannot be used: File name too long``), a ``run_as`` that is
  no user here, a command or variable longer than ``exec`` takes. A job whose supervisor could not be
  started is answered with 201 and status ``FAILED``, ``reason`` says why.
  503 when the agent takes no new job: draining, or full (``max_jobs`` unfinished jobs already;
  with ``Retry-After``), or a check of ``cwd``/``run_as`` got no answer in time (a hung mount). Nothing
  is recorded then: the sidecar may send the job to another agent.
- ``GET /jobs?status=S`` (``status`` repeatable, optional) -> ``{"jobs": [job, ...]}`` in job-id order.
- ``GET /jobs?changed_since=<cursor>`` -> ``{"jobs": [job, ...], "cursor", "full"}``: the catch-up read,
  every job whose state changed since an earlier answer's ``cursor`` (new jobs included), in the order
  of their last change; ``cursor`` is what to pass next time. Empty, or a cursor of an earlier agent
  process (they do not outlive a restart), answers every job with ``full`` true. A cursor this agent
  cannot have given is 400. With ``status``: only the changed jobs now of those statuses (the cursor
  still passes every change). Costs O(changes since the cursor) (:mod:`agent.changes`).
- ``GET /jobs/{job_id}`` -> the job.
- ``GET /jobs/{job_id}/log?offset=N&limit=M`` -> the log's bytes from ``offset`` (``text/plain``), with
  headers ``X-Log-Size`` (whole log) and ``X-Next-Offset`` (where to continue: ``offset`` plus the
  bytes returned). ``offset`` and ``limit`` have at most 18 digits. From at or past the end of the log
  the answer is no bytes and ``X-Next-Offset`` = ``offset``: a client paging by it waits where it is.
  ``cursor=1``: the reader is the task's log, which has shown everything before ``offset``; the job
  keeps that mark across restarts and the bytes start at the later of ``offset`` and the mark
  (``X-Next-Offset`` minus the bytes returned).
- ``POST /stop/{job_id}`` ``{"force": false, "reason": "..."}`` (body optional) -> once the tree is gone,
  ``{"ok", "message", "status", "rc", "action", "signal", "reason"}``. A stop of a job the agent
  has never seen leaves a tombstone (a FAILED job of that id): a ``/run`` arriving later is refused.
- ``POST /drain``, ``POST /undrain`` (body optional: a JSON object, its keys ignored) -> ``{"agent_id",
  "draining", "jobs_running"}``: take no new job (kept in the home: a restart stays draining), or take
  them again. Running jobs are not touched. 503 when the flag cannot be saved or removed (the agent
  is then draining, and stays so): retry.
- ``GET /healthz`` (and ``/health``, its older name) -> ``{"status": "ok", "agent_id", "jobs_running",
  "max_jobs", "draining", "version", "fence"}`` (the sidecar checks ``agent_id`` against the id it has
  configured for this URL); ``GET /readyz`` -> ``{"status": "ready", "agent_id", "jobs_running"}``, or
  503 ``"draining"`` (the same fields: a drained VM can stop once ``jobs_running`` is 0) or ``"not
  ready"`` with ``problems`` (home not writable). These three need no token.

Auth, errors and bodies follow :mod:`servicekit.http`, as the sidecar does: ``Authorization: Bearer
<token>`` or ``X-Agent-Token: <token>``; any configured token is accepted (rotation), and, on an
agent that registers, the call token derived from its credential (:mod:`agent.identity`), which only
the sidecar holds. Never the fleet token: that opens the sidecar's registration alone. Tokens from a
``token_file`` follow the file while the agent runs (looked at every second, read again on SIGHUP):
rotating them needs no restart.
TLS: with ``tls_cert_file`` and ``tls_key_file`` configured, the same API is served over HTTPS only.
Job ids: ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`` (see :mod:`agent_api.protocol`).
Every failure is a JSON ``{"error": "..."}`` naming the problem: 400 bad input (NUL or a lone
surrogate in any string or key of a body included), 401 auth, 404 unknown job or route, 405 a method
the route lacks (``Allow`` lists those it has), 409 duplicate job, 413 body larger than
``max_body_bytes``, 500 a bug (logged), 503 no new job now (draining or full). Rejected requests
change nothing. Logs never contain the token: it is only read from headers, never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from agent.config import AgentConfig
from agent.fence import Fence
from agent.identity import CallTokens
from agent.jobs import JobManager, JobRejected
from agent.registration import Registration, Work
from agent_api.maintenance import DrainRequest
from agent_api.protocol import (
    AgentJobStatus,
    DrainState,
    JobChanges,
    ProtocolError,
    parse_run_request,
    parse_stop_request,
    validate_job_id,
)
from servicekit.credentials import Secret, View, follow, token_list
from servicekit.http import (
    HttpError,
    carries_token,
    json_errors,
    query_flag,
    query_int,
    read_json,
    token_auth,
)
from servicekit.serve import serving, shutdown_requested

log = logging.getLogger(__name__)

_CONFIG: web.AppKey[AgentConfig] = web.AppKey("config", AgentConfig)
_JOBS: web.AppKey[JobManager] = web.AppKey("jobs", JobManager)
_REGISTRATION: web.AppKey[Registration] = web.AppKey("registration", Registration)  # set when it registers
OPEN_PATHS = ("/healthz", "/readyz", "/health")
STOP_ANSWER_SLACK_SECONDS = 15.0  # beyond grace_seconds: waiting for the exit record, answering
READY_CHECK_TIMEOUT_SECONDS = 2.0  # a home on a hung disk is "not ready", not a hung probe
LAST_HEARTBEAT_SECONDS = 5.0  # at shutdown: the heartbeat saying the agent leaves gets this long


def _package_version() -> str:
    try:
        return version("agentic-airflow")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


VERSION = _package_version()


def _known(exc: Exception) -> HttpError | None:
    if isinstance(exc, JobRejected):
        return HttpError(exc.status, exc.message, headers=exc.headers)
    if isinstance(exc, ProtocolError):
        return HttpError(400, str(exc))
    return None


async def _body(request: web.Request, *, allow_empty: bool = False) -> object:
    return await read_json(request, limit=request.app[_CONFIG].max_body_bytes, allow_empty=allow_empty)


def _job_id(request: web.Request) -> str:
    return validate_job_id(request.match_info["job_id"])


async def _run(request: web.Request) -> web.Response:
    run_request = parse_run_request(await _body(request))
    info = await request.app[_JOBS].run(run_request)
    return web.json_response(info.to_json(), status=201)


async def _list(request: web.Request) -> web.Response:
    """``GET /jobs?status=RUNNING&status=QUEUED``: the sidecar's orphan sweep, one request per agent;
    ``GET /jobs?changed_since=<cursor>``: its catch-up read, the jobs changed since an earlier answer."""
    wanted = request.query.getall("status", [])
    try:
        statuses = frozenset(AgentJobStatus(value) for value in wanted) if wanted else None
    except ValueError:
        raise ProtocolError(f"status must be one of {', '.join(s.value for s in AgentJobStatus)}") from None
    jobs = request.app[_JOBS]
    if "changed_since" not in request.query:
        return web.json_response({"jobs": [info.to_json() for info in jobs.list(statuses)]})
    changed, cursor, full = jobs.changes_since(_changed_since(request), statuses=statuses)
    await jobs.mark_delivered(changed)  # as GET /jobs/{id} does: the reader now knows how they ended
    return web.json_response(JobChanges(tuple(changed), cursor, full).to_json())


def _changed_since(request: web.Request) -> str | None:
    """The cursor to answer from; None when empty (every job). Its form is checked by the job manager."""
    values = request.query.getall("changed_since")
    if len(values) > 1:
        raise ProtocolError(
            f"query parameter changed_since is given {len(values)} times; give it at most once"
        )
    return values[0] or None


async def _get(request: web.Request) -> web.Response:
    return web.json_response(request.app[_JOBS].get(_job_id(request)).to_json())


async def _log(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    offset = query_int(request, "offset") or 0
    limit = query_int(request, "limit")
    cursor = query_flag(request, "cursor")
    chunk = await request.app[_JOBS].read_log(job_id, offset=offset, limit=limit, cursor=cursor)
    return web.Response(
        body=chunk.data,
        content_type="text/plain",
        headers={"X-Log-Size": str(chunk.size), "X-Next-Offset": str(chunk.next_offset)},
    )


async def _stop(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    stop_request = parse_stop_request(await _body(request, allow_empty=True))
    result = await request.app[_JOBS].stop(job_id, force=stop_request.force, reason=stop_request.reason)
    return web.json_response(result.to_json())


async def _drain(request: web.Request) -> web.Response:
    asked = DrainRequest.from_json(await _body(request, allow_empty=True))
    jobs, config = request.app[_JOBS], request.app[_CONFIG]
    try:
        jobs.admission.drain(replace(asked, by=asked.by or "POST /drain"))
        _heartbeat_now(request.app)
    except OSError as exc:
        raise HttpError(
            503,
            f"agent {config.id} is draining, but cannot save that in {config.home} "
            f"({exc.strerror or exc}): a restart would undrain it; retry",
        ) from None
    return web.json_response(_drain_state(config, jobs).to_json())


async def _undrain(request: web.Request) -> web.Response:
    await _ignored_body(request)
    jobs, config = request.app[_JOBS], request.app[_CONFIG]
    try:
        jobs.admission.undrain()
        _heartbeat_now(request.app)
    except OSError as exc:
        problem = exc.strerror or exc
        raise HttpError(
            503, f"agent {config.id} stays draining: cannot remove its flag ({problem}); retry"
        ) from None
    return web.json_response(_drain_state(config, jobs).to_json())


async def _ignored_body(request: web.Request) -> None:
    """A body is optional and its keys are ignored, but it is read as any other: a body that is not a
    JSON object is a client's mistake, answered 400 before anything changes."""
    if not isinstance(await _body(request, allow_empty=True), dict):
        raise ProtocolError("request body must be a JSON object, or empty")


def _drain_state(config: AgentConfig, jobs: JobManager) -> DrainState:
    return DrainState(
        agent_id=config.id,
        draining=jobs.admission.draining,
        jobs_running=jobs.running_count(),
        maintenance=jobs.admission.maintenance,
    )


async def _health(request: web.Request) -> web.Response:
    """Liveness (``/healthz``, and ``/health`` for probes deployed before it): the process answers.
    The sidecar also reads the agent's capacity from it (``max_jobs``, ``draining``)."""
    jobs = request.app[_JOBS]
    return web.json_response(
        {
            "status": "ok",
            "agent_id": request.app[_CONFIG].id,
            "jobs_running": jobs.running_count(),
            "max_jobs": jobs.admission.max_jobs,
            "draining": jobs.admission.draining,
            # Who drained it, when, why, and when what still runs is stopped (agent_api/maintenance.py).
            "maintenance": m.to_json() if (m := jobs.admission.maintenance) is not None else None,
            # Its automatic maintenance: why it takes no new job by itself (agent/self_check.py).
            "unwell": u.to_json() if (u := jobs.admission.unwell) is not None else None,
            "version": VERSION,
            # How it fences (agent_api/fencing.py): the sidecar ends a fenced job FAILED no sooner.
            "fence": request.app[_CONFIG].fence_terms.to_json(),
            # Finished jobs kept on disk and their bytes, as of the last retention check.
            "jobs_retained": jobs.retained.jobs,
            "retained_bytes": jobs.retained.bytes,
            # With router_url: where it registers, and how the last heartbeat went.
            **(
                {"registration": registration.status()}
                if (registration := request.app.get(_REGISTRATION))
                else {}
            ),
        }
    )


async def _ready(request: web.Request) -> web.Response:
    """Readiness: the agent can take a job, i.e. is not draining and can write to its home (a full or
    read-only disk cannot). Draining is a 503 of its own: it is what an operator waits on (for
    ``jobs_running`` to reach 0) before stopping the VM."""
    config, jobs = request.app[_CONFIG], request.app[_JOBS]
    problems = []
    try:
        await asyncio.wait_for(asyncio.to_thread(_write_probe, config.home), READY_CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        problems.append(f"home {config.home} did not answer a write within {READY_CHECK_TIMEOUT_SECONDS} s")
    except OSError as exc:
        problems.append(f"home {config.home} is not writable: {exc.strerror or exc}")
    if (unwell := jobs.admission.unwell) is not None and not problems:
        problems.append(unwell.reason)
    draining = jobs.admission.draining
    if problems and draining:
        problems.append("draining: it takes no new job")
    status = "not ready" if problems else "draining" if draining else "ready"
    answer: dict[str, object] = {
        "status": status,
        "agent_id": config.id,
        "jobs_running": jobs.running_count(),
    }
    if problems:
        answer["problems"] = problems
    return web.json_response(answer, status=200 if status == "ready" else 503)


def _write_probe(home: Path) -> None:
    with tempfile.TemporaryFile(dir=home):
        pass


def _heartbeat_now(app: web.Application) -> None:
    registration = app.get(_REGISTRATION)
    if registration is not None:  # the sidecar hears of the drain flag now, not at the next heartbeat
        registration.poke()


def _heard(fence: Fence, tokens: Secret[tuple[str, ...]]) -> Middleware:
    """An agent in the sidecar's [[agents]] hears from it by the leader's health checks: a ``GET
    /health`` (or ``/healthz``) carrying one of its tokens. Only the leading replica checks health, and
    judges liveness by it; any other call (a standby's ``/run``, a log read, a stop) says nothing of
    what the leader thinks of this agent, so it is no contact."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method == "GET"
            and request.path in ("/health", "/healthz")
            and carries_token(request, tokens)
        ):
            fence.heard()
        return await handler(request)

    return middleware


def create_app(
    config: AgentConfig,
    jobs: JobManager,
    *,
    tokens: Secret[tuple[str, ...]] | None = None,
    registration: Registration | None = None,
) -> web.Application:
    """The API; ``tokens``: the accepted tokens as they change (default: ``config.tokens``, fixed)."""
    accepted = tokens or Secret(config.tokens, what="[agent] token")
    middlewares = [
        json_errors(service="agent", known=_known),
        token_auth(accepted, open_paths=OPEN_PATHS, extra_header="X-Agent-Token"),
        *([] if config.registers else [_heard(jobs.fence, accepted)]),
    ]
    # client_max_size is not our limit (read_json applies max_body_bytes); keep aiohttp's out of the way
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes + 1)
    app[_CONFIG] = config
    app[_JOBS] = jobs
    if registration is not None:
        app[_REGISTRATION] = registration
    app.router.add_post("/run", _run)
    app.router.add_get("/jobs", _list)
    app.router.add_get("/jobs/{job_id}", _get)
    app.router.add_get("/jobs/{job_id}/log", _log)
    app.router.add_post("/stop/{job_id}", _stop)
    app.router.add_post("/drain", _drain)
    app.router.add_post("/undrain", _undrain)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/health", _health)
    app.router.add_get("/readyz", _ready)
    return app


async def serve(config: AgentConfig) -> None:
    """Adopt existing jobs, then listen until SIGTERM or SIGINT; running jobs are left running.

    With ``drain_on_shutdown_seconds`` > 0 a SIGTERM means a planned shutdown: the agent drains (for
    this run only: restarted, it takes jobs again, unless a drain was asked for through ``/drain``)
    and, still serving status and stop requests, waits that long for its jobs to end. A second signal
    cuts the wait short (the main task is cancelled)."""
    ssl_context = config.server_ssl_context()  # before adoption: a bad file fails fast
    # No identity yet: the first look reads the file, so a change since the config was loaded counts.
    own = Secret(config.tokens, what="[agent] token", file=config.token_file, parse=token_list)
    fleet = Secret(
        config.fleet_tokens, what="[agent] router token", file=config.router_token_file, parse=token_list
    )
    jobs = JobManager(config)
    await jobs.load()  # before listening: /healthz answers only once adoption is done
    jobs.start_monitor()
    stopping = shutdown_requested()
    watcher = asyncio.create_task(follow([own, fleet]))
    registration = (
        Registration(config, token=fleet, work=lambda: _work(jobs), version=VERSION, feed=jobs)
        if config.registers
        else None
    )
    if registration is not None:  # the fence counts its accepted heartbeats as contact
        registration.fence = jobs.fence
    # The sidecar calls a registered agent with a token derived from its credential, accepted beside
    # the agent's own; never with the fleet token, which opens registration alone.
    tokens: Secret[tuple[str, ...]] = own
    if registration is not None:
        calls = CallTokens(registration.credentials)
        tokens = View("[agent] tokens", [own, calls], lambda a, b: tuple(dict.fromkeys(a + b)))
    heartbeats: asyncio.Task[None] | None = None
    leave = asyncio.Event()  # set once the agent stops serving: its last heartbeat says it leaves
    try:
        # A stop under way (SIGTERM, grace_seconds, SIGKILL, the exit record) finishes before the
        # listener closes: the sidecar hears its outcome instead of a dropped connection.
        grace = config.grace_seconds + STOP_ANSWER_SLACK_SECONDS
        app = create_app(config, jobs, tokens=tokens, registration=registration)
        async with serving(app, host=config.host, port=config.port, ssl_context=ssl_context, grace=grace):
            log.info("agent %s listening on %s://%s:%d", config.id, config.scheme, config.host, config.port)
            if registration is not None:  # listening first: the sidecar calls back at once
                heartbeats = asyncio.create_task(registration.run(leave))
            await stopping.wait()
            if config.drain_on_shutdown_seconds > 0:
                await _drain_for_shutdown(config, jobs, registration)
            log.info("shutting down; running jobs keep running and are adopted on restart")
            if heartbeats is not None:  # the last heartbeat, while its jobs' ends can still be read
                leave.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(heartbeats), LAST_HEARTBEAT_SECONDS)
    finally:
        watcher.cancel()
        background = [watcher] if heartbeats is None else [watcher, heartbeats]
        if heartbeats is not None:
            heartbeats.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await jobs.close()


def _work(jobs: JobManager) -> Work:
    admission = jobs.admission
    return Work(
        max_jobs=admission.max_jobs,
        jobs_running=jobs.running_count(),
        draining=admission.draining,
        maintenance=admission.maintenance,
        unwell=admission.unwell,
    )


async def _drain_for_shutdown(
    config: AgentConfig, jobs: JobManager, registration: Registration | None
) -> None:
    jobs.admission.drain(DrainRequest(by="SIGTERM", comment="a planned shutdown"), persist=False)
    if registration is not None:
        registration.poke()
    running = jobs.running_count()
    if not running:
        return
    log.info("waiting up to %g s for %d running jobs to end", config.drain_on_shutdown_seconds, running)
    if not await jobs.wait_idle(config.drain_on_shutdown_seconds):
        log.warning("drain_on_shutdown_seconds over with %d jobs running", jobs.running_count())
