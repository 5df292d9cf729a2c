"""``AgentClient``: the one client every part of the project uses to talk to an agent.

    async with AgentClient("http://10.0.0.5:8791", token) as agent:
        info = await agent.run("job-1", RunPayload(command="make all"))
        result = await agent.stop("job-1", reason="task instance failed")

Errors, for callers that retry (with tenacity; the client itself never retries):

- :class:`AgentUnavailable` — connection refused or reset, timeout, HTTP 5xx, or an answer that does not
  parse: retryable. ``.answered`` tells a 5xx the agent itself answered (it received the request and
  failed it) from no answer at all (the request may have been carried out).
- :class:`AgentRejected` — HTTP 4xx (bad input, auth, duplicate job): retrying will not help.
  ``.status`` is the HTTP status, ``.message`` the server's explanation.
- :class:`JobNotFound` (an :class:`AgentRejected`) — HTTP 404: the agent does not know the job.
- :class:`ChangesUnsupported` — ``changed_since`` only: the agent predates change reads; read its jobs
  one by one instead.
- :class:`AgentBusy` (an :class:`AgentRejected`) — ``run`` only: HTTP 503 with the agent's own error,
  the agent is draining or full (``max_jobs``) and recorded nothing. Unlike an unreachable agent, it
  certainly did not start the job: another agent may take it, or this one after ``.retry_after``
  seconds (set when full; None when draining). Any other 503 (a proxy's, say) is :class:`AgentUnavailable`.

Answers are parsed strictly into frozen dataclasses; a garbage answer raises :class:`AgentUnavailable`
and never yields a half-filled object. Job ids are checked before sending (``ValueError``), because an
id like ``../x`` would otherwise address a different URL. The token is sent in the ``Authorization``
header only and never appears in an error message.

HTTPS: an ``https://`` agent's certificate is verified against the system's trusted CAs, or against
the bundle in ``ca_file`` (PEM) when one is given; a certificate that does not verify raises
:class:`AgentUnavailable`, before any request (and so the token) is sent. The CA bundle is applied
per request, so clients for agents with different CAs can share one ``aiohttp.ClientSession``.

``transport``: what carries one exchange (default: aiohttp). The core's simulation passes its own, so
that the real request building and answer parsing run against simulated agents.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar

import aiohttp

from agent_api.maintenance import DrainRequest
from agent_api.protocol import (
    DrainState,
    JobChanges,
    JobInfo,
    LogChunk,
    ProtocolError,
    RunPayload,
    StopResult,
    validate_cursor,
    validate_job_id,
)

__all__ = [
    "AgentBusy",
    "AgentClient",
    "AgentError",
    "AgentRejected",
    "AgentUnavailable",
    "ChangesUnsupported",
    "DrainState",
    "JobInfo",
    "JobNotFound",
    "LogChunk",
    "RunPayload",
    "StopResult",
]

_T = TypeVar("_T")


class Transport(Protocol):
    """One HTTP exchange: the answer's status, headers and body (at most ``max_bytes``, else
    :class:`AgentUnavailable`). Raises ``TimeoutError`` past ``timeout`` and ``aiohttp.ClientError``
    when no answer came, as aiohttp does."""

    async def __call__(
        self,
        method: str,
        url: str,
        *,
        body: object,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int,
    ) -> tuple[int, Mapping[str, str], bytes]: ...


class AgentError(Exception):
    """Base of every error the client raises (except ``ValueError`` for an invalid job id)."""


class AgentUnavailable(AgentError):
    """The agent could not be reached or gave no usable answer; retrying may help.

    ``answered``: the HTTP status (5xx) of an error answer in the agent's own JSON shape: the agent
    received the request and says it failed (to ``run``: it started nothing). None when there was no
    answer (refused, reset, timed out), or one from something else (a proxy's 502): the request may
    have been carried out."""

    def __init__(self, message: str, *, answered: int | None = None) -> None:
        super().__init__(message)
        self.answered = answered


class AgentRejected(AgentError):
    """The agent refused the request (HTTP 4xx, or :class:`AgentBusy`); retrying the same request
    at once will not help (:class:`AgentBusy`: another agent may take the job)."""

    def __init__(self, status: int, message: str, *, request: str) -> None:
        super().__init__(f"{request}: HTTP {status}: {message}")
        self.status = status
        self.message = message


class JobNotFound(AgentRejected):
    """HTTP 404: the agent does not know this job."""


class ChangesUnsupported(AgentError):
    """``GET /jobs?changed_since=`` is answered without a cursor: the agent predates change reads (it
    ignores the parameter and lists every job). Asking again will not help; read jobs one by one."""


class AgentBusy(AgentRejected):
    """HTTP 503 to ``run``, from the agent itself: it is draining or full, and started nothing.
    ``retry_after``: the agent's ``Retry-After`` in seconds (when full), else None."""

    def __init__(self, status: int, message: str, *, request: str, retry_after: float | None) -> None:
        super().__init__(status, message, request=request)
        self.retry_after = retry_after


# An answer is read up to these sizes, and refused beyond (AgentUnavailable): whatever answers at an
# agent's URL must not make the sidecar hold hundreds of megabytes. Job lists grow with the agent's
# retained jobs (about 300 bytes each); a log chunk is at most the agent's 4 MiB; the rest is small.
MAX_ANSWER_BYTES = 1024 * 1024
MAX_LIST_BYTES = 64 * 1024 * 1024
MAX_LOG_BYTES = 4 * 1024 * 1024 + 64 * 1024
_READ_CHUNK = 64 * 1024


class AgentClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
        stop_timeout: float = 120.0,
        ca_file: str | os.PathLike[str] | None = None,
        transport: Transport | None = None,
    ) -> None:
        """``timeout`` bounds every request but ``stop``, which waits for the tree to end and is
        bounded by ``stop_timeout`` (keep it above the agent's ``grace_seconds``). ``ca_file``: PEM
        bundle of the CAs that may sign an ``https://`` agent's certificate (default: the system's);
        ``ValueError`` if it cannot be loaded."""
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._ssl = _verifying_context(ca_file)
        self._session = session
        self._owns_session = session is None
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self._transport = transport  # None: aiohttp (a bound method kept here would be a reference cycle)

    def __repr__(self) -> str:
        return f"AgentClient({self.base_url!r})"

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if the client created it (a session passed in is the caller's)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------------------ API

    async def run(self, job_id: str, payload: RunPayload | Mapping[str, Any]) -> JobInfo:
        body_payload = payload.to_json() if isinstance(payload, RunPayload) else dict(payload)
        body = {"job_id": validate_job_id(job_id), "payload": body_payload}
        answer = await self._json("POST", "/run", body=body, busy=True)
        return _parse(JobInfo.from_json, answer, f"POST {self.base_url}/run")

    async def get(self, job_id: str) -> JobInfo:
        path = f"/jobs/{validate_job_id(job_id)}"
        return _parse(JobInfo.from_json, await self._json("GET", path), f"GET {self.base_url}{path}")

    async def jobs(self, *statuses: str) -> list[JobInfo]:
        """Every job the agent knows, or those of the given statuses (e.g. ``"RUNNING"``)."""
        where = f"GET {self.base_url}/jobs"
        raw, _ = await self._request(
            "GET", "/jobs", params=[("status", s) for s in statuses], max_bytes=MAX_LIST_BYTES
        )
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            raise AgentUnavailable(f"{where}: answer is not JSON") from None
        items = answer.get("jobs") if isinstance(answer, dict) else None
        if not isinstance(items, list):
            raise AgentUnavailable(f"{where}: answer lacks a jobs list")
        return [_parse(JobInfo.from_json, item, where) for item in items]

    async def changed_since(self, cursor: str | None) -> tuple[list[JobInfo], str, bool]:
        """The jobs whose state changed since ``cursor``, each as it is now, in the order of their last
        change; the cursor to pass next time; and whether the answer is full.

        ``cursor``: what an earlier answer returned, kept as an opaque string (at most 64 characters of
        A-Z a-z 0-9 . _ -; ``ValueError`` otherwise, before any request). None asks for every job.
        ``full`` True (after None, or after the agent restarted: cursors do not outlive it): the jobs
        are every job the agent knows, and one not listed is unknown to it. A cursor the agent cannot
        have given is :class:`AgentRejected` (400): ask again with None. An agent that predates change
        reads raises :class:`ChangesUnsupported`.
        """
        if cursor is not None:
            validate_cursor(cursor)
        where = f"GET {self.base_url}/jobs?changed_since"
        raw, _ = await self._request(
            "GET", "/jobs", params={"changed_since": cursor or ""}, max_bytes=MAX_LIST_BYTES
        )
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            raise AgentUnavailable(f"{where}: answer is not JSON") from None
        if isinstance(answer, dict) and isinstance(answer.get("jobs"), list) and "cursor" not in answer:
            raise ChangesUnsupported(f"{where}: the agent answers without a cursor: it predates change reads")
        changes = _parse(JobChanges.from_json, answer, where)
        return list(changes.jobs), changes.cursor, changes.full

    async def log(
        self, job_id: str, offset: int = 0, limit: int | None = None, *, cursor: bool = False
    ) -> LogChunk:
        """The job's output from ``offset``; ``cursor``: as the task's log (see the agent's API)."""
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("offset and limit must not be negative")
        path = f"/jobs/{validate_job_id(job_id)}/log"
        params = {"offset": str(offset)} | ({"limit": str(limit)} if limit is not None else {})
        if cursor:
            params["cursor"] = "1"
        body, headers = await self._request("GET", path, params=params, max_bytes=MAX_LOG_BYTES)
        where = f"GET {self.base_url}{path}"
        try:
            size, next_offset = int(headers["X-Log-Size"]), int(headers["X-Next-Offset"])
        except (KeyError, ValueError):
            raise AgentUnavailable(f"{where}: answer without valid X-Log-Size/X-Next-Offset") from None
        return LogChunk(data=body, next_offset=next_offset, size=size)

    async def stop(self, job_id: str, *, force: bool = False, reason: str = "") -> StopResult:
        path = f"/stop/{validate_job_id(job_id)}"
        answer = await self._json(
            "POST", path, body={"force": force, "reason": reason}, timeout=self.stop_timeout
        )
        return _parse(StopResult.from_json, answer, f"POST {self.base_url}{path}")

    async def health(self) -> dict[str, Any]:
        """The agent's ``/health`` answer: ``status`` ("ok"), ``agent_id``, ``jobs_running``; and from
        agents that have them, ``max_jobs`` (0: no limit), ``draining`` and ``version``."""
        answer = await self._json("GET", "/health")
        if not isinstance(answer, dict) or answer.get("status") != "ok":
            raise AgentUnavailable(f"GET {self.base_url}/health: unexpected answer")
        return answer

    async def drain(self, request: DrainRequest | None = None) -> DrainState:
        """The agent takes no new job from now on (and after a restart) until :meth:`undrain`; its
        running jobs go on (until the request's timeout, if any). Idempotent; an agent that could not
        save the flag is AgentUnavailable."""
        return await self._drain_call("/drain", (request or DrainRequest()).to_json())

    async def undrain(self) -> DrainState:
        """The agent takes new jobs again. Idempotent."""
        return await self._drain_call("/undrain", {})

    async def _drain_call(self, path: str, body: dict[str, Any]) -> DrainState:
        answer = await self._json("POST", path, body=body)
        return _parse(DrainState.from_json, answer, f"POST {self.base_url}{path}")

    # ------------------------------------------------------------------------------ transport

    async def _json(
        self, method: str, path: str, *, body: object = None, timeout: float | None = None, busy: bool = False
    ) -> object:
        raw, _ = await self._request(method, path, body=body, timeout=timeout, busy=busy)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise AgentUnavailable(f"{method} {self.base_url}{path}: answer is not JSON") from None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        timeout: float | None = None,
        busy: bool = False,
        max_bytes: int = MAX_ANSWER_BYTES,
    ) -> tuple[bytes, Mapping[str, str]]:
        """One HTTP exchange; returns a 2xx answer, raises the documented errors for anything else.
        ``busy``: a 503 carrying the agent's JSON error is :class:`AgentBusy` (the agent took nothing)."""
        where = f"{method} {self.base_url}{path}"
        seconds = self.timeout if timeout is None else timeout
        try:
            status, headers, raw = await (self._transport or self._aiohttp)(
                method,
                self.base_url + path,
                body=body,
                params=params,
                headers={"Authorization": f"Bearer {self._token}"} if self._token else {},
                timeout=seconds,
                max_bytes=max_bytes,
            )
        except TimeoutError:
            raise AgentUnavailable(f"{where}: no answer within {seconds:g} s") from None
        except aiohttp.ClientError as exc:
            raise AgentUnavailable(f"{where}: {self._scrub(f'{type(exc).__name__}: {exc}')}") from None
        if 200 <= status < 300:
            return raw, headers
        message = self._scrub(_error_message(raw))
        if busy and status == 503 and _agent_error(raw) is not None:
            retry_after = _retry_after_seconds(headers.get("Retry-After"))
            raise AgentBusy(status, message, request=where, retry_after=retry_after)
        if status == 404:
            raise JobNotFound(status, message, request=where)
        if 400 <= status < 500:
            raise AgentRejected(status, message, request=where)
        answered = status if _agent_error(raw) is not None else None
        raise AgentUnavailable(f"{where}: HTTP {status}: {message}", answered=answered)

    async def _aiohttp(
        self,
        method: str,
        url: str,
        *,
        body: object,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int,
    ) -> tuple[int, Mapping[str, str], bytes]:
        async with self._client().request(
            method,
            url,
            json=body,
            params=params,
            headers=headers or None,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
            ssl=self._ssl,
        ) as response:
            raw = await _bounded_read(response, max_bytes, f"{method} {url}")
            return response.status, response.headers, raw

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


async def _bounded_read(response: aiohttp.ClientResponse, max_bytes: int, where: str) -> bytes:
    """The answer's body, or AgentUnavailable once it passes ``max_bytes`` (read no further)."""
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise AgentUnavailable(f"{where}: answer of {declared} bytes, more than the {max_bytes} read")
    body = bytearray()
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise AgentUnavailable(f"{where}: answer longer than the {max_bytes} bytes read")
    return bytes(body)


def _verifying_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext | bool:
    """``True`` is aiohttp's default: verify against the system's CAs."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"ca_file: cannot load CA bundle {os.fspath(ca_file)!r}: {reason}") from None


def _error_message(raw: bytes) -> str:
    error = _agent_error(raw)
    if error is not None:
        return error[:500]
    text = raw.decode("utf-8", "replace").strip()
    return text[:200] or "(empty answer)"


def _agent_error(raw: bytes) -> str | None:
    """The ``error`` of the agent's ``{"error": "..."}`` answer, or None for any other body."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return str(answer["error"])
    return None


def _retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (the agent's form); None when absent or an HTTP date."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def _parse(parser: Callable[[object], _T], answer: object, where: str) -> _T:
    try:
        return parser(answer)
    except ProtocolError as exc:
        raise AgentUnavailable(f"{where}: unexpected answer: {exc}") from None
