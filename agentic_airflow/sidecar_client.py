"""The provider's client of the sidecar's router API (httpx: Airflow ships it): the operator's, the
trigger's, the hook's and the optional callbacks'.

No Airflow import here, so it is usable and testable on its own; the answers' words come from
:mod:`sidecar_api.protocol`, the module the sidecar answers with.
"""

from __future__ import annotations

import enum
import json
import math
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from sidecar_api.protocol import (
    MAX_WAIT_SECONDS,
    TERMINAL,
    JobStatus,
    WireError,
    job_not_found,
    parse_update,
    validate_name,
)

MAX_ERROR_CHARS = 300  # of an answer's error text quoted in a log line
# One read of the job's output, at most: the output is shown at the next poll if it did not come, but
# a read stuck at a hung agent must not keep the trigger from hearing, or reporting, its job's end.
OUTPUT_READ_SECONDS = 2.0
ALL_STATUSES = frozenset(s.value for s in JobStatus)


def logical_date_identity(moment: datetime) -> str:
    """A run's logical date as the identity of its task instances on Airflow 2 (no task-instance id
    there); the reconciler reads Airflow's API into the same text."""
    return "logical_date:" + moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SidecarError(Exception):
    """The sidecar refused a request or answered something unusable. Never carries the token."""


@dataclass(frozen=True)
class SidecarEndpoint:
    base_url: str
    token: str
    ca_file: str = ""  # CA bundle that signed the sidecar's certificate ("" = the system's trust store)

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"SidecarEndpoint(base_url={self.base_url!r})"

    @classmethod
    def from_connection(
        cls,
        *,
        conn_type: str | None,
        host: str | None,
        port: int | None,
        password: str | None,
        extra: dict[str, Any],
    ) -> SidecarEndpoint:
        """Read an Airflow connection: ``agentic-run://:TOKEN@host:port`` (or ``http://``, ``https://``)
        or JSON with ``host``, ``port``, ``password``; the address is :func:`sidecar_address`'s;
        ``extra.ca_file`` is the CA bundle that verifies an https sidecar (default: the system's
        trust store)."""
        base = sidecar_address(conn_type=conn_type, host=host, port=port, extra=extra)
        if not password:
            raise SidecarError("the sidecar connection has no token (set the connection's password)")
        ca_file = extra.get("ca_file") or ""
        if not isinstance(ca_file, str):
            raise SidecarError("the sidecar connection's extra ca_file must be a path (a string)")
        return cls(base, password, ca_file)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}

    def verify(self) -> ssl.SSLContext:
        """The TLS verification for httpx's ``verify=``: ``ca_file`` if set, else the system's CAs.
        Loading a bundle takes tens of milliseconds: call it off an event loop."""
        try:
            return ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SidecarError(
                f"the sidecar connection's extra ca_file {self.ca_file}: cannot load: {reason}"
            ) from None


SCHEMES = ("http", "https")


def sidecar_address(
    *, conn_type: str | None, host: str | None, port: int | None, extra: dict[str, Any]
) -> str:
    """The sidecar's base URL from a connection, without its token (an extra link needs no more).

    ``extra.base_url`` if set (the older override), else ``host`` with its own scheme if it has one,
    else ``extra.scheme``, else https for the ``https`` connection type and http for any other
    (``agentic_run``, ``http``); then ``:port``. Then ``extra.base_path``, for a sidecar served under a
    path prefix, behind a proxy that routes ``/agentic/...`` to it, say."""
    base = extra.get("base_url")
    if not base:
        if not host:
            raise SidecarError("the sidecar connection has no host")
        base = host if "://" in host else f"{_scheme(conn_type, extra)}://{host}"
        if port:
            base = f"{base}:{port}"
    return str(base).rstrip("/") + _base_path(extra)


def _scheme(conn_type: str | None, extra: dict[str, Any]) -> str:
    chosen = extra.get("scheme")
    if chosen in (None, ""):
        return "https" if conn_type == "https" else "http"
    if not isinstance(chosen, str) or chosen.lower() not in SCHEMES:
        raise SidecarError("the sidecar connection's extra scheme must be http or https")
    return chosen.lower()


def _base_path(extra: dict[str, Any]) -> str:
    """``extra.base_path`` as ``/a/b`` (slashes around it ignored), or "" when unset."""
    path = extra.get("base_path") or ""
    if not isinstance(path, str) or any(c in path for c in "?#:") or any(c.isspace() for c in path):
        raise SidecarError("the sidecar connection's extra base_path must be a URL path, such as /agentic")
    path = path.strip("/")
    return f"/{path}" if path else ""


class TransientSubmitError(SidecarError):
    """The submission did not get through, for a reason that may pass: no connection, a timeout, 5xx,
    429, 401/403 (a token rotation). Retrying is safe: a submission is idempotent per task instance.

    ``answer_lost``: the request may have reached the sidecar, and no answer of the sidecar's came (a
    timeout or a connection cut once it was sent, a proxy's 502/504, an internal error): the sidecar
    may have taken the job."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        unauthorized: bool = False,
        answer_lost: bool = False,
    ):
        super().__init__(message)
        self.retry_after = retry_after
        self.unauthorized = unauthorized
        self.answer_lost = answer_lost


# Failures before the request left this process: the sidecar cannot have seen it.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
# Answers that leave nothing behind: the sidecar's "no capacity" or "router DB unreachable" (503), its
# rate limit (429) and its token check (401/403) all come before anything is recorded.
NOTHING_RECORDED = (401, 403, 429, 503)


def submit_job(
    endpoint: SidecarEndpoint, request: dict[str, Any], *, timeout: float = 30.0
) -> dict[str, Any]:
    """``POST /jobs``, once; idempotent per task-instance try (a resubmission returns the same job).

    Raises :class:`TransientSubmitError` for what may pass, :class:`SidecarError` for what will not
    (a refused request, a certificate that does not verify)."""
    try:
        verify = endpoint.verify()
    except SidecarError as exc:  # the CA file may be mid-rotation, as for the trigger
        raise TransientSubmitError(str(exc)) from None
    try:
        with httpx.Client(
            base_url=endpoint.base_url, headers=endpoint.headers, timeout=timeout, verify=verify
        ) as client:
            response = client.post("/jobs", json=request)
    except httpx.HTTPError as exc:
        message = describe_failure(endpoint, exc)
        if "certificate verification failed" in message:
            raise SidecarError(message) from None
        raise TransientSubmitError(message, answer_lost=not isinstance(exc, NOT_SENT)) from None
    code = response.status_code
    parsed = parse_object(response.content)
    error = _error_text(parsed)
    # Only the sidecar's own JSON refusal of this request is final; any other failure says something
    # about the path to it (a restart, a proxy's page, a rate limit, a token rotation).
    if code not in (200, 201) and (code in (401, 403, 429) or code >= 500 or not error):
        raise TransientSubmitError(
            f"sidecar at {endpoint.base_url}: HTTP {code}" + (f": {error}" if error else ""),
            retry_after=retry_after_seconds(response.headers.get("Retry-After"), now=datetime.now(UTC)),
            unauthorized=code in (401, 403),
            answer_lost=code not in NOTHING_RECORDED and code >= 500,
        )
    body = _json(response)
    if code not in (200, 201):
        raise SidecarError(f"sidecar refused the job: HTTP {code}: {error}")
    if not isinstance(body.get("job_id"), str) or not isinstance(body.get("status"), str):
        raise SidecarError("sidecar answer lacks job_id/status")
    return body


UPDATE_TIMEOUT_SECONDS = 20.0  # the sidecar answers once the stop is done, within its 15 s wait


def status_update_request(
    *,
    status: str,
    reason: str | None = None,
    job_id: str | None = None,
    dag_id: str | None = None,
    task_id: str | None = None,
    run_id: str | None = None,
    map_index: int = -1,
) -> dict[str, Any]:
    """The body of ``POST /jobs/update_status``: the job by ``job_id``, else by its task instance
    (the sidecar takes that task's newest try). Checked by the sidecar's own parser, so a body it
    would refuse raises :class:`WireError` here, naming the field."""
    body: dict[str, Any] = {"status": status}
    if reason is not None:
        body["reason"] = reason
    if job_id is not None:
        body["job_id"] = job_id
    else:
        if not (dag_id and task_id and run_id):
            raise WireError("name the job: job_id, or dag_id, task_id and run_id")
        for name, value in (("dag_id", dag_id), ("task_id", task_id), ("run_id", run_id)):
            body[name] = validate_name(name, value)
        body["map_index"] = map_index
    parse_update(body)
    return body


def post_status_update(
    endpoint: SidecarEndpoint,
    body: dict[str, Any],
    *,
    timeout: float = UPDATE_TIMEOUT_SECONDS,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """``POST /jobs/update_status``, once: the sidecar's answer (``ok``, ``action``, ``message``, the
    job before and after). The sidecar reads the task instance from Airflow itself and stops the job
    only if Airflow confirms, so its refusals are answers too: 404 (no such job), 409 (``kept``:
    Airflow still wants the task), 503 (Airflow could not be read: nothing stopped).

    Raises :class:`SidecarError` when no answer of the sidecar's came: unreachable, the token refused
    (401/403), rate-limited (429), a body without ``action`` (a proxy's page)."""
    try:
        with httpx.Client(
            base_url=endpoint.base_url,
            headers=endpoint.headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            verify=endpoint.verify(),
            transport=transport,
        ) as client:
            response = client.post("/jobs/update_status", json=body)
    except httpx.HTTPError as exc:
        raise SidecarError(describe_failure(endpoint, exc)) from None
    code, answer = response.status_code, parse_object(response.content)
    if code in (401, 403, 429) or answer is None or "action" not in answer:
        error = _error_text(answer)
        raise SidecarError(f"sidecar at {endpoint.base_url}: HTTP {code}" + (f": {error}" if error else ""))
    return answer


class AnswerKind(enum.Enum):
    """What an answer to ``GET /jobs/{id}`` means for a task waiting on the job."""

    JOB = "job"  # the job's record: its status says whether it has ended
    NO_SUCH_JOB = "no_such_job"  # the sidecar's own 404 for this id: it will never know the job
    THROTTLED = "throttled"  # 429: the sidecar's rate limit (or a proxy's)
    UNAUTHORIZED = "unauthorized"  # 401/403: a token rotation, or a connection not yet updated
    UNAVAILABLE = "unavailable"  # 5xx: the sidecar, or a proxy in front of it, failed
    UNUSABLE = "unusable"  # anything else: not JSON, the wrong shape, a proxy's 404 page, other 4xx


@dataclass(frozen=True)
class JobAnswer:
    kind: AnswerKind
    detail: str  # what happened, for a log line; never the token
    job: dict[str, Any] | None = None  # the record, when kind is JOB
    retry_after: float | None = None  # seconds the answer asked to wait (Retry-After), if any

    @property
    def final(self) -> bool:
        """True when waiting longer cannot change the outcome: the job ended, or it does not exist."""
        if self.kind is AnswerKind.NO_SUCH_JOB:
            return True
        return self.job is not None and self.job.get("status") in TERMINAL


def classify_job_answer(
    job_id: str,
    *,
    status_code: int,
    content_type: str,
    body: bytes,
    retry_after: str | None,
    now: datetime,
) -> JobAnswer:
    """Read an answer to ``GET /jobs/{job_id}``. Only a job record and the sidecar's own JSON
    ``{"error": "job not found: <job_id>"}`` are facts about the job; every other answer says
    something about the path to the sidecar (a restart, a proxy, a rate limit, a rotation) and is
    worth waiting out, because the job may well be running meanwhile."""
    parsed = parse_object(body)
    error = _error_text(parsed)
    if status_code == 200:
        if parsed is None:
            return JobAnswer(AnswerKind.UNUSABLE, "HTTP 200 with a body that is not a JSON object")
        if not isinstance(parsed.get("status"), str):
            return JobAnswer(AnswerKind.UNUSABLE, "HTTP 200 without a job status")
        if parsed.get("job_id", job_id) != job_id:
            return JobAnswer(AnswerKind.UNUSABLE, "HTTP 200 describing another job")
        return JobAnswer(AnswerKind.JOB, f"job status {parsed['status']}", job=parsed)
    if status_code == 404:
        if content_type.lower().startswith("application/json") and error == job_not_found(job_id):
            return JobAnswer(AnswerKind.NO_SUCH_JOB, error)
        return JobAnswer(
            AnswerKind.UNUSABLE, "HTTP 404 without the sidecar's job-not-found answer (a proxy's page?)"
        )
    detail = f"HTTP {status_code}: {error}" if error else f"HTTP {status_code}"
    wait = retry_after_seconds(retry_after, now=now)
    if status_code == 429:
        return JobAnswer(AnswerKind.THROTTLED, detail, retry_after=wait)
    if status_code in (401, 403):
        return JobAnswer(AnswerKind.UNAUTHORIZED, detail)
    if status_code >= 500:
        return JobAnswer(AnswerKind.UNAVAILABLE, detail, retry_after=wait)
    return JobAnswer(AnswerKind.UNUSABLE, detail)


def retry_after_seconds(value: str | None, *, now: datetime) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP-date (RFC 9110); None when
    absent or unreadable, 0 for a date already past."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def job_query(*, wait: float = 0.0, status: str | None = None) -> dict[str, str]:
    """The query of ``GET /jobs/{id}``: ``wait`` seconds at most for the job's status to differ from
    ``status`` (a long-poll; a sidecar that predates it ignores both and answers at once). ``wait``
    is sent in the sidecar's form (up to 6 decimals, at most MAX_WAIT_SECONDS), never as 1e-07."""
    seconds = min(max(wait, 0.0), MAX_WAIT_SECONDS)
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")
    if text in ("", "0"):
        return {}
    query = {"wait": text}
    if status in ALL_STATUSES:
        query["status"] = str(status)
    return query


async def fetch_job_answer(
    client: httpx.AsyncClient,
    job_id: str,
    *,
    wait: float = 0.0,
    status: str | None = None,
    timeout: float | None = None,
) -> JobAnswer:
    """``GET /jobs/{id}``, classified; with ``wait``, a long-poll (see :func:`job_query`) whose
    request may take ``timeout`` seconds (default: the client's). Raises httpx errors when no answer
    came at all."""
    params = job_query(wait=wait, status=status)
    if timeout is None:
        return classify_response(job_id, await client.get(f"/jobs/{job_id}", params=params))
    return classify_response(job_id, await client.get(f"/jobs/{job_id}", params=params, timeout=timeout))


def classify_response(job_id: str, response: httpx.Response) -> JobAnswer:
    """:func:`classify_job_answer` of an answer to ``GET /jobs/{job_id}`` (sync or async client)."""
    return classify_job_answer(
        job_id,
        status_code=response.status_code,
        content_type=response.headers.get("Content-Type", ""),
        body=response.content,
        retry_after=response.headers.get("Retry-After"),
        now=datetime.now(UTC),
    )


async def get_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """``GET /jobs/{id}``: the job's record. Raises :class:`SidecarError` on any other answer,
    httpx errors when there was none."""
    answer = await fetch_job_answer(client, job_id)
    if answer.job is None:
        raise SidecarError(f"sidecar: {answer.detail}")
    return answer.job


async def log_tail(client: httpx.AsyncClient, job_id: str, max_bytes: int) -> str:
    """The last ``max_bytes`` of the job's output, or a note saying why there is none."""
    try:
        head = await client.get(
            f"/jobs/{job_id}/log", params={"offset": 0, "limit": 1}, timeout=OUTPUT_READ_SECONDS
        )
        if head.status_code != 200:
            return f"(log unavailable: HTTP {head.status_code})"
        size = int(head.headers.get("X-Log-Size", "0"))
        tail = await client.get(
            f"/jobs/{job_id}/log", params={"offset": max(0, size - max_bytes)}, timeout=OUTPUT_READ_SECONDS
        )
        if tail.status_code != 200:
            return f"(log unavailable: HTTP {tail.status_code})"
        return tail.content.decode("utf-8", errors="replace")
    except (httpx.HTTPError, ValueError) as exc:
        return f"(log unavailable: {type(exc).__name__})"


def describe_failure(endpoint: SidecarEndpoint, exc: httpx.HTTPError) -> str:
    """Why the sidecar could not be reached, in words an operator can act on (never the token)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            trust = f"the CA in ca_file {endpoint.ca_file}" if endpoint.ca_file else "the system's CAs"
            return (
                f"sidecar at {endpoint.base_url}: TLS certificate verification failed against {trust} "
                f"({cause.verify_message}); set the connection's extra ca_file to the CA that signed it"
            )
        cause = cause.__cause__ or cause.__context__
    return f"sidecar at {endpoint.base_url} unreachable: {type(exc).__name__}"


def parse_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # ValueError covers bad JSON and bad UTF-8 alike
        return None
    return parsed if isinstance(parsed, dict) else None


def _error_text(body: dict[str, Any] | None) -> str:
    error = body.get("error") if body is not None else None
    return error[:MAX_ERROR_CHARS] if isinstance(error, str) else ""


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise SidecarError(f"sidecar answered HTTP {response.status_code} with a non-JSON body") from None
    if not isinstance(body, dict):
        raise SidecarError("sidecar answer is not a JSON object")
    return body
