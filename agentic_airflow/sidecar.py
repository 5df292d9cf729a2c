"""The operator's and trigger's client of the sidecar's router API (httpx: Airflow ships it).

No Airflow import here, so it is usable and testable on its own.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import httpx

TERMINAL = frozenset({"SUCCEEDED", "FAILED"})


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
        """Read an Airflow connection: ``http://:TOKEN@host:port`` or JSON with ``host``, ``port``,
        ``password``; ``extra.base_url`` overrides the address; ``extra.ca_file`` is the CA bundle that
        verifies an https sidecar (default: the system's trust store)."""
        base = extra.get("base_url")
        if not base:
            if not host:
                raise SidecarError("the sidecar connection has no host")
            scheme = "https" if conn_type == "https" else "http"
            base = host if "://" in host else f"{scheme}://{host}"
            if port:
                base = f"{base}:{port}"
        if not password:
            raise SidecarError("the sidecar connection has no token (set the connection's password)")
        ca_file = extra.get("ca_file") or ""
        if not isinstance(ca_file, str):
            raise SidecarError("the sidecar connection's extra ca_file must be a path (a string)")
        return cls(str(base).rstrip("/"), password, ca_file)

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


def submit_job(
    endpoint: SidecarEndpoint, request: dict[str, Any], *, timeout: float = 30.0
) -> dict[str, Any]:
    """``POST /jobs``; idempotent per task-instance try (a resubmission returns the same job)."""
    verify = endpoint.verify()
    try:
        with httpx.Client(
            base_url=endpoint.base_url, headers=endpoint.headers, timeout=timeout, verify=verify
        ) as client:
            response = client.post("/jobs", json=request)
    except httpx.HTTPError as exc:
        raise SidecarError(describe_failure(endpoint, exc)) from None
    body = _json(response)
    if response.status_code not in (200, 201):
        raise SidecarError(f"sidecar refused the job: HTTP {response.status_code}: {body.get('error', body)}")
    if not isinstance(body.get("job_id"), str) or not isinstance(body.get("status"), str):
        raise SidecarError("sidecar answer lacks job_id/status")
    return body


async def get_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """``GET /jobs/{id}``. Raises :class:`SidecarError` on 4xx; httpx errors for transient faults."""
    response = await client.get(f"/jobs/{job_id}")
    if response.status_code >= 500:
        response.raise_for_status()
    body = _json(response)
    if response.status_code != 200:
        raise SidecarError(f"sidecar: HTTP {response.status_code}: {body.get('error', body)}")
    if not isinstance(body.get("status"), str):
        raise SidecarError("sidecar answer lacks status")
    return body


async def log_tail(client: httpx.AsyncClient, job_id: str, max_bytes: int) -> str:
    """The last ``max_bytes`` of the job's output, or a note saying why there is none."""
    try:
        head = await client.get(f"/jobs/{job_id}/log", params={"offset": 0, "limit": 1})
        if head.status_code != 200:
            return f"(log unavailable: HTTP {head.status_code})"
        size = int(head.headers.get("X-Log-Size", "0"))
        tail = await client.get(f"/jobs/{job_id}/log", params={"offset": max(0, size - max_bytes)})
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


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise SidecarError(f"sidecar answered HTTP {response.status_code} with a non-JSON body") from None
    if not isinstance(body, dict):
        raise SidecarError("sidecar answer is not a JSON object")
    return body
