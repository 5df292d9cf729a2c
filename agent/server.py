"""The agent's HTTP API (aiohttp), a thin layer over :class:`agent.jobs.JobManager`.

Routes (JSON in and out unless noted):

- ``POST /run`` ``{"job_id", "payload": {"command", "cwd", "env", "run_as", "timeout_seconds"}}``
  -> 201 with the job (``job_id, status, pid, rc, started_at, finished_at, reason``); 409 if the id exists.
  ``command`` runs as ``/bin/sh -c command``; ``cwd`` (absolute, must exist) defaults to the agent's
  working directory, or to the home of ``run_as`` (``/`` if it has none); ``env`` is merged over the
  agent's environment (minus the agent's own ``AGENTIC_AGENT_*`` variables and token); ``run_as``
  needs an agent running as root; ``timeout_seconds`` stops the job (SIGTERM, grace, SIGKILL) with a
  reason saying so.
  A job that could not be started is answered with 201 and status ``FAILED``, ``reason`` says why.
- ``GET /jobs?status=S`` (``status`` repeatable, optional) -> ``{"jobs": [job, ...]}`` in job-id order.
- ``GET /jobs/{job_id}`` -> the job.
- ``GET /jobs/{job_id}/log?offset=N&limit=M`` -> the log's bytes from ``offset`` (``text/plain``), with
  headers ``X-Log-Size`` (whole log) and ``X-Next-Offset`` (where to continue: ``offset`` plus the
  bytes returned). ``offset`` and ``limit`` have at most 18 digits. From at or past the end of the log
  the answer is no bytes and ``X-Next-Offset`` = ``offset``: a client paging by it waits where it is.
- ``POST /stop/{job_id}`` ``{"force": false, "reason": "..."}`` (body optional) -> once the tree is gone,
  ``{"ok", "message", "status", "rc", "action", "signal", "reason"}``. A stop of a job the agent
  has never seen leaves a tombstone (a FAILED job of that id): a ``/run`` arriving later is refused.
- ``GET /health`` -> ``{"status": "ok", "agent_id", "jobs_running"}``; the only route without a token.

Auth: ``Authorization: Bearer <token>`` or ``X-Agent-Token: <token>``; any of the configured tokens
is accepted (rotation), and every one of them is compared, each in constant time.
TLS: with ``tls_cert_file`` and ``tls_key_file`` configured, the same API is served over HTTPS only.
Job ids: ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`` (see :mod:`agent_api.protocol`).
Every failure is a JSON ``{"error": "..."}`` naming the problem: 400 bad input (NUL or a lone
surrogate in any string or key of a body included), 401 auth, 404 unknown job or route, 405 a method
the route lacks (``Allow`` lists those it has), 409 duplicate job, 413 body larger than
``max_body_bytes``, 500 a bug (logged). Rejected requests change nothing. Logs never contain the
token: it is only read from headers, never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.config import AgentConfig
from agent.jobs import JobManager, JobRejected
from agent_api.protocol import (
    JobStatus,
    ProtocolError,
    parse_run_request,
    parse_stop_request,
    validate_job_id,
)
from servicekit.text import text_problem

log = logging.getLogger(__name__)

ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'  # no headers: they carry the token
_CONFIG: web.AppKey[AgentConfig] = web.AppKey("config", AgentConfig)
_TOKENS: web.AppKey[tuple[bytes, ...]] = web.AppKey("tokens", tuple)
_JOBS: web.AppKey[JobManager] = web.AppKey("jobs", JobManager)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error; the server never dies on a request."""
    try:
        return await handler(request)
    except JobRejected as exc:
        return error_response(exc.status, exc.message)
    except ProtocolError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status != 405:
            return error_response(exc.status, exc.reason)
        allow = exc.headers.get("Allow", "")
        response = error_response(
            405, f"method {request.method} not allowed on {request.path}; allowed: {allow}"
        )
        response.headers["Allow"] = allow
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal error in the agent (logged)")


@web.middleware
async def _auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
    if request.path == "/health":
        return await handler(request)
    # aiohttp decodes non-UTF-8 header bytes as surrogate escapes: encode them back, never fail on them.
    presented = _presented_token(request).encode("utf-8", "surrogateescape")
    accepted = False
    for token in request.app[_TOKENS]:  # no early exit: the time taken does not tell which one matched
        accepted |= hmac.compare_digest(presented, token)
    if not accepted:
        return error_response(401, "missing or invalid token (Authorization: Bearer or X-Agent-Token)")
    return await handler(request)


def _presented_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-Agent-Token", "").strip()


async def _read_json(request: web.Request, *, allow_empty: bool = False) -> object:
    limit = request.app[_CONFIG].max_body_bytes
    too_large = JobRejected(413, f"request body is larger than max_body_bytes={limit}")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        if allow_empty:
            return {}
        raise ProtocolError("request body is empty; expected a JSON object")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolError("request body is not valid JSON") from None
    problem = text_problem(value)
    if problem is not None:
        raise ProtocolError(problem)
    return value


def _job_id(request: web.Request) -> str:
    return validate_job_id(request.match_info["job_id"])


def _query_int(request: web.Request, name: str) -> int | None:
    """A non-negative integer of at most 18 digits (below 2**63: every file offset), or None if absent."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ProtocolError(f"{name} must be a non-negative integer of at most 18 digits")
    return int(raw)


async def _run(request: web.Request) -> web.Response:
    run_request = parse_run_request(await _read_json(request))
    info = await request.app[_JOBS].run(run_request)
    return web.json_response(info.to_json(), status=201)


async def _list(request: web.Request) -> web.Response:
    """``GET /jobs?status=RUNNING&status=QUEUED``: the sidecar's orphan sweep, one request per agent."""
    wanted = request.query.getall("status", [])
    try:
        statuses = frozenset(JobStatus(value) for value in wanted) if wanted else None
    except ValueError:
        raise ProtocolError(f"status must be one of {', '.join(s.value for s in JobStatus)}") from None
    return web.json_response({"jobs": [info.to_json() for info in request.app[_JOBS].list(statuses)]})


async def _get(request: web.Request) -> web.Response:
    return web.json_response(request.app[_JOBS].get(_job_id(request)).to_json())


async def _log(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    offset = _query_int(request, "offset") or 0
    limit = _query_int(request, "limit")
    chunk = await request.app[_JOBS].read_log(job_id, offset=offset, limit=limit)
    return web.Response(
        body=chunk.data,
        content_type="text/plain",
        headers={"X-Log-Size": str(chunk.size), "X-Next-Offset": str(chunk.next_offset)},
    )


async def _stop(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    stop_request = parse_stop_request(await _read_json(request, allow_empty=True))
    result = await request.app[_JOBS].stop(job_id, force=stop_request.force, reason=stop_request.reason)
    return web.json_response(result.to_json())


async def _health(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "status": "ok",
            "agent_id": request.app[_CONFIG].id,
            "jobs_running": request.app[_JOBS].running_count(),
        }
    )


def create_app(config: AgentConfig, jobs: JobManager) -> web.Application:
    # client_max_size is not our limit (bodies are read by _read_json); keep aiohttp's out of the way
    app = web.Application(middlewares=[_errors, _auth], client_max_size=config.max_body_bytes + 1)
    app[_CONFIG] = config
    app[_TOKENS] = tuple(token.encode() for token in config.tokens)
    app[_JOBS] = jobs
    app.router.add_post("/run", _run)
    app.router.add_get("/jobs", _list)
    app.router.add_get("/jobs/{job_id}", _get)
    app.router.add_get("/jobs/{job_id}/log", _log)
    app.router.add_post("/stop/{job_id}", _stop)
    app.router.add_get("/health", _health)
    return app


async def serve(config: AgentConfig) -> None:
    """Adopt existing jobs, then listen until SIGTERM or SIGINT; running jobs are left running."""
    ssl_context = config.server_ssl_context()  # before adoption: a bad file fails fast
    jobs = JobManager(config)
    await jobs.load()  # before listening: /health answers only once adoption is done
    jobs.start_monitor()
    runner = web.AppRunner(create_app(config, jobs), access_log_format=ACCESS_LOG_FORMAT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
        await site.start()
        log.info("agent %s listening on %s://%s:%d", config.id, config.scheme, config.host, config.port)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("shutting down; running jobs keep running and are adopted on restart")
    finally:
        await runner.cleanup()
        await jobs.close()
