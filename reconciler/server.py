"""The sidecar's HTTP API: job submission and queries (the router API), metrics and health.

Token auth on everything but ``/metrics``, ``/healthz`` and ``/readyz``. The token setting may hold
several tokens separated by commas or whitespace (rotation: old and new both accepted); every one is
compared, each in constant time. With a rate limit configured, each client (the token it presented,
or its address when it presented no valid token) gets a token bucket; past it, 429 with
``Retry-After``. Bad input gets a 4xx JSON ``{"error": ...}`` naming the problem and changes nothing.
Text no router DB can store (a NUL character: PostgreSQL refuses it where SQLite keeps it; a lone
surrogate) is refused wherever it is, in any body string or key and in query parameters, before any
field is looked at.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent_api.client import AgentError, AgentRejected, AgentUnavailable, JobNotFound
from reconciler.agents import AgentPool, NoAgent
from reconciler.airflow import AirflowError
from reconciler.loop import Reconciler, refresh_from_agent
from reconciler.metrics import Metrics
from reconciler.ratelimit import RateLimiter
from reconciler.stops import StopDispatcher
from router_db import JobRecord, JobStatus, NewJob, RouterDB, StaleTransition, TaskInstanceKey
from servicekit.text import text_problem

log = logging.getLogger("reconciler.server")

MAX_BODY_BYTES = 1024 * 1024
UPDATE_WAIT_SECONDS = 15.0  # update_status answers with the stop's outcome if the agent is this quick
MAX_COMMAND_BYTES = 64 * 1024
LOST_AGENT_RETRY_AFTER = 15  # seconds: a submission to a lost agent is answered 503 with this
MAX_NAME_CHARS = 250  # dag_id, task_id, run_id: Airflow's own limit
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
MAX_INT = 2**31 - 1  # map_index, try_number, offsets: far beyond any real value, within every DB's int


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class SubmitRequest:
    key: TaskInstanceKey
    command: str
    agent_id: str | None
    labels: list[str]
    payload: dict[str, Any]  # what the agent's POST /run receives besides the command
    ti_identity: str = ""  # the task instance's id (Airflow 3) or run's logical date (Airflow 2)


def parse_submit(body: Any) -> SubmitRequest:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    command = _field(body, "command", str)
    if not command.strip() or len(command.encode()) > MAX_COMMAND_BYTES:
        raise BadRequest(f"command must be non-empty and at most {MAX_COMMAND_BYTES} bytes")
    ids = {name: _name(name, _field(body, name, str)) for name in ("dag_id", "task_id", "run_id")}
    map_index = _field(body, "map_index", int, default=-1)
    try_number = _field(body, "try_number", int)
    if not (-1 <= map_index <= MAX_INT and 0 <= try_number <= MAX_INT):
        raise BadRequest(f"map_index must be -1 to {MAX_INT} and try_number 0 to {MAX_INT}")
    agent_id = _field(body, "agent_id", str, default=None)
    labels = _field(body, "labels", list, default=[])
    if not all(isinstance(label, str) for label in labels):
        raise BadRequest("labels must be a list of strings")
    env = _field(body, "env", dict, default=None)
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise BadRequest("env must map strings to strings")
    timeout = body.get("timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_INT
    ):
        raise BadRequest(f"timeout_seconds must be a positive number up to {MAX_INT}, or null")
    payload = {
        "command": command,
        "cwd": _field(body, "cwd", str, default=None),
        "env": env,
        "run_as": _field(body, "run_as", str, default=None),
        "timeout_seconds": timeout,
    }
    ti_identity = _field(body, "ti_identity", str, default="")
    if len(ti_identity) > 64:
        raise BadRequest("ti_identity must be at most 64 characters")
    key = TaskInstanceKey(ids["dag_id"], ids["task_id"], ids["run_id"], map_index, try_number)
    return SubmitRequest(key, command, agent_id, labels, payload, ti_identity)


_MISSING: Any = object()


def _name(field: str, value: str) -> str:
    if not value or len(value) > MAX_NAME_CHARS:
        raise BadRequest(f"{field} must be 1-{MAX_NAME_CHARS} characters")
    return value


def _field(body: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise BadRequest(f"missing field {name!r}")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"field {name!r} must be {kind.__name__}")
    return value


class SidecarAPI:
    def __init__(
        self,
        *,
        db: RouterDB,
        agents: AgentPool,
        metrics: Metrics,
        reconciler: Reconciler,
        dispatcher: StopDispatcher,
        token: str,
        ready_after: float,
        rate_limiter: RateLimiter | None = None,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self._db = db
        self._agents = agents
        self._metrics = metrics
        self._reconciler = reconciler
        self._dispatcher = dispatcher
        # Several tokens (rotation): separated by commas or whitespace, like the agent's.
        self._tokens = tuple(dict.fromkeys(t.encode() for t in re.split(r"[,\s]+", token) if t))
        if not self._tokens:
            raise ValueError("the sidecar needs at least one token")
        self._limiter = rate_limiter
        self._is_leader = is_leader
        self._ready_after = ready_after  # seconds without a successful cycle before /readyz fails

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.router.add_post("/jobs", self.submit)
        app.router.add_post("/jobs/update_status", self.update_status)
        app.router.add_get("/jobs", self.list_jobs)
        app.router.add_get("/jobs/{job_id}", self.get_job)
        app.router.add_get("/jobs/{job_id}/log", self.job_log)
        app.router.add_get("/jobs/{job_id}/events", self.job_events)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc))
        except web.HTTPException as exc:
            if exc.status == 413:
                return _error(413, f"body larger than {MAX_BODY_BYTES} bytes")
            if exc.status == 405:
                response = _error(405, f"method {request.method} not allowed on {request.path}")
                response.headers["Allow"] = exc.headers.get("Allow", "")
                return response
            return _error(exc.status, exc.reason)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error(500, "internal error; see the sidecar log")

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        given_bytes = given.encode("utf-8", "surrogateescape")  # non-UTF-8 header bytes arrive escaped
        matched = -1
        for index, token in enumerate(self._tokens):  # no early exit: timing does not tell which
            if hmac.compare_digest(given_bytes, token):
                matched = index
        if self._limiter is not None:
            # Keyed by the token's position, never the token itself; unauthenticated callers by
            # address, so guessing tokens is throttled too.
            client = f"token#{matched}" if matched >= 0 else f"addr:{request.remote}"
            retry_after = self._limiter.acquire(client)
            if retry_after:
                response = _error(429, f"rate limit exceeded; retry in {retry_after} s")
                response.headers["Retry-After"] = str(retry_after)
                return response
        if not given or matched < 0:
            return _error(401, "missing or wrong token (Authorization: Bearer <token>)")
        return await handler(request)

    async def submit(self, request: web.Request) -> web.Response:
        req = parse_submit(await _read_json(request))
        try:
            agent_id = self._agents.route(agent_id=req.agent_id, labels=req.labels)
        except NoAgent as exc:
            raise BadRequest(str(exc)) from None
        if self._reconciler.agent_states().get(agent_id) == "lost" and (
            await asyncio.to_thread(self._db.find, req.key, req.ti_identity) is None
        ):
            # No new work for a lost agent (routing by labels already avoids it): the operator
            # retries, and the job starts once the agent answers again.
            response = _error(503, f"agent {agent_id} is lost: it does not answer its health checks")
            response.headers["Retry-After"] = str(LOST_AGENT_RETRY_AFTER)
            return response
        new = NewJob(req.key, agent_id, req.command, req.ti_identity)
        job, created = await asyncio.to_thread(self._db.submit, new)
        if created:
            job = await self._start_on_agent(job, req.payload)
        return web.json_response(
            {
                "job_id": job.job_id,
                "agent_id": job.agent_id,
                "status": str(job.status),
                "created": created,
                # A job the agent refused is FAILED at once: the caller needs to know why.
                "rc": job.rc,
                "reason": job.reason,
            },
            status=201 if created else 200,
        )

    async def _start_on_agent(self, job: JobRecord, payload: dict[str, Any]) -> JobRecord:
        try:
            await self._agents.client(job.agent_id).run(job.job_id, payload)
        except AgentRejected as exc:
            return await asyncio.to_thread(
                self._db.finish,
                job.job_id,
                status=JobStatus.FAILED,
                rc=None,
                reason=f"agent refused the job: {exc}",
                source="submit",
            )
        except AgentUnavailable:
            # The agent may or may not have started it: stay QUEUED; the loop asks the agent later
            # and records RUNNING or FAILED, and stops it like any job if Airflow says so.
            log.warning("agent unreachable at submit; job stays QUEUED", extra={"job_id": job.job_id})
            return job
        try:
            return await asyncio.to_thread(self._db.mark_running, job.job_id, source="submit")
        except StaleTransition:
            return await asyncio.to_thread(self._db.get, job.job_id) or job

    async def update_status(self, request: web.Request) -> web.Response:
        """The push endpoint: someone reports a task's new state; the job is found by ``job_id`` or
        by ``dag_id``/``task_id``/``run_id`` (newest try) and checked exactly as the poll loop would:
        Airflow is read directly, and the job is stopped only if Airflow confirms the divergence."""
        job = await self._find_for_update(await _read_json(request))
        if job is None:
            return _update_answer(404, False, "Job not found with provided identifiers", None, "none")
        if not job.active:
            return _update_answer(200, True, f"job already ended {job.status}", job, "already_final")
        if job.status is JobStatus.STOPPING:
            return _update_answer(200, True, "stop already under way", job, "stop_pending")
        try:
            stop = await self._reconciler.check(job, source="api")
        except AirflowError as exc:
            return _update_answer(
                503, False, f"cannot confirm with Airflow ({exc}); nothing stopped", job, "none"
            )
        if stop is None:
            message = "Airflow still wants this task instance to run; job not stopped"
            return _update_answer(409, False, message, job, "kept")
        await self._dispatcher.wait(job.job_id, UPDATE_WAIT_SECONDS)
        after = await asyncio.to_thread(self._db.get, job.job_id) or job
        if after.status is JobStatus.STOPPING:
            message = f"{stop.reason}; Agent communication failed or is slow, the stop is retried every cycle"
            return _update_answer(202, True, message, after, "stop_requested", previous=job.status)
        return _update_answer(200, True, stop.reason, after, "stopped", previous=job.status)

    async def _find_for_update(self, body: Any) -> JobRecord | None:
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        status = _field(body, "status", str)
        if not status or len(status) > 32:
            raise BadRequest("status must be 1-32 characters")
        _field(body, "reason", str, default=None)
        job_id = _field(body, "job_id", str, default=None)
        if job_id is not None:
            if not JOB_ID.fullmatch(job_id):
                raise BadRequest("job_id must match " + JOB_ID.pattern)
            return await asyncio.to_thread(self._db.get, job_id)
        ids = [_field(body, name, str) for name in ("dag_id", "task_id", "run_id")]
        map_index = _field(body, "map_index", int, default=-1)
        if not -1 <= map_index <= MAX_INT:
            raise BadRequest(f"map_index must be -1 to {MAX_INT}")
        return await asyncio.to_thread(self._db.find_latest, ids[0], ids[1], ids[2], map_index)

    async def get_job(self, request: web.Request) -> web.Response:
        job = await self._job(request)
        # An agent that does not answer its health checks is not asked: the trigger polling this job
        # must hear at once that the router DB ended it, not after a timeout.
        if self._reconciler.answering(job.agent_id):
            job = await refresh_from_agent(self._db, self._agents, job)
        return web.json_response(job.to_json())

    async def list_jobs(self, request: web.Request) -> web.Response:
        """Jobs matching every filter given; a filter left out matches everything (see :func:`_query`)."""
        dag_id, run_id, status, limit = (_query(request, n) for n in ("dag_id", "run_id", "status", "limit"))
        for name, value in (("dag_id", dag_id), ("run_id", run_id)):
            if value is not None:
                _name(name, value)
        try:
            statuses = [JobStatus(status)] if status is not None else None
        except ValueError:
            raise BadRequest(f"unknown status {status!r}; one of {[s.value for s in JobStatus]}") from None
        try:
            most = int(limit or "1000")
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        jobs = await asyncio.to_thread(
            self._db.search,
            dag_id=dag_id,
            run_id=run_id,
            statuses=statuses,
            limit=max(1, min(most, 10000)),
        )
        return web.json_response({"jobs": [j.to_json() for j in jobs]})

    async def job_events(self, request: web.Request) -> web.Response:
        """The job's audit trail: every status change with its time, source and reason."""
        job = await self._job(request)
        events = await asyncio.to_thread(self._db.events, job.job_id)
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
        job = await self._job(request)
        try:
            offset = int(request.query.get("offset", "0"))
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            raise BadRequest("offset and limit must be integers") from None
        if not 0 <= offset <= MAX_INT or (limit is not None and not 1 <= limit <= MAX_INT):
            raise BadRequest(f"offset must be 0 to {MAX_INT} and limit 1 to {MAX_INT}")
        if not self._reconciler.answering(job.agent_id):
            state = self._reconciler.agent_states().get(job.agent_id, "unknown")
            return _error(502, f"agent {job.agent_id} is {state}: it does not answer its health checks")
        try:
            chunk = await self._agents.client(job.agent_id).log(job.job_id, offset=offset, limit=limit)
        except JobNotFound:
            return _error(404, f"agent {job.agent_id} has no log for job {job.job_id}")
        except AgentError as exc:
            return _error(502, f"agent {job.agent_id} communication failed: {exc}")
        return web.Response(
            body=chunk.data,
            content_type="text/plain",
            headers={"X-Log-Size": str(chunk.size), "X-Next-Offset": str(chunk.next_offset)},
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        try:
            await asyncio.to_thread(self._db.ping)
        except Exception as exc:
            problems.append(f"router DB unreachable: {type(exc).__name__}")
        # A standby runs no cycles: it is ready when it can serve the API, i.e. reach the router DB.
        role = "leader" if self._is_leader() else "standby"
        last = self._reconciler.last_success
        if role == "leader" and (last is None or time.monotonic() - last > self._ready_after):
            problems.append("no successful reconcile cycle recently (Airflow reachable?)")
        if problems:
            return web.json_response({"status": "not ready", "role": role, "problems": problems}, status=503)
        # Still ready (the API serves, the incremental reads run), but people need to see these.
        warnings = []
        if role == "leader" and self._reconciler.full_read_error is not None:
            warnings.append(f"full read of task instances failing: {self._reconciler.full_read_error}")
        lost = [agent for agent, state in self._reconciler.agent_states().items() if state == "lost"]
        if role == "leader" and lost:
            warnings.append(f"agents lost: {', '.join(lost)}")
        answer: dict[str, object] = {"status": "ready", "role": role}
        if warnings:
            answer["warnings"] = warnings
        return web.json_response(answer)

    async def _job(self, request: web.Request) -> JobRecord:
        job_id = request.match_info["job_id"]
        if not JOB_ID.fullmatch(job_id):
            raise BadRequest("job id must match " + JOB_ID.pattern)
        job = await asyncio.to_thread(self._db.get, job_id)
        if job is None:
            raise web.HTTPNotFound(reason=f"job not found: {job_id}")
        return job


def _update_answer(
    code: int,
    ok: bool,
    message: str,
    job: JobRecord | None,
    action: str,
    *,
    previous: JobStatus | None = None,
) -> web.Response:
    return web.json_response(
        {
            "ok": ok,
            "message": message,
            "action": action,
            "job_id": job.job_id if job else None,
            "previous_status": str(previous) if previous else (str(job.status) if job else None),
            "status": str(job.status) if job else None,
            "rc": job.rc if job else None,
        },
        status=code,
    )


async def _read_json(request: web.Request) -> Any:
    """The body as JSON: strict UTF-8, bounded depth, and every string and key text a router DB can
    store (no NUL, no lone surrogate, not even as \\u escapes); the error names the field."""
    raw = await request.read()  # aiohttp enforces MAX_BODY_BYTES (client_max_size): 413
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("body is not valid UTF-8") from None
    except (ValueError, RecursionError):  # ValueError includes JSONDecodeError and huge integers
        raise BadRequest("body is not valid JSON") from None
    problem = text_problem(body)
    if problem is not None:
        raise BadRequest(problem)
    return body


def _query(request: web.Request, name: str) -> str | None:
    """A query parameter, or None when absent. Given once, not empty (an empty filter is a template
    gone wrong, not "any": leave it out for that), and text a router DB can store."""
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter {name} is given {len(values)} times; give it at most once")
    if not values[0]:
        raise BadRequest(f"query parameter {name} is empty; leave it out to match any")
    problem = text_problem({name: values[0]})
    if problem is not None:
        raise BadRequest(f"query parameter {problem}")
    return values[0]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
