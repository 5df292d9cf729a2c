"""The CLI's client of the sidecar's API: where it is and the token, from flags or the environment.

Errors become :class:`CliError` with the exit code scripts can rely on; the token never appears in one.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

URL_ENV = "AGENTIC_SIDECAR_URL"
TOKEN_ENV = "AGENTIC_TOKEN"
TOKEN_FILE_ENV = "AGENTIC_TOKEN_FILE"
CA_FILE_ENV = "AGENTIC_CA_FILE"

OK, FAILED, USAGE, NOT_FOUND, UNREACHABLE = 0, 1, 2, 3, 4
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH: the CA is right, the name is not.
HOSTNAME_MISMATCH = (62, 64)


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    url: str
    token: str = field(repr=False)
    ca_file: str = ""

    @classmethod
    def resolve(
        cls, *, url: str | None, token_file: str | None, ca_file: str | None, env: Mapping[str, str]
    ) -> Target:
        """From the flags, else the environment: ``AGENTIC_SIDECAR_URL``, ``AGENTIC_TOKEN`` or
        ``AGENTIC_TOKEN_FILE`` (its first line), ``AGENTIC_CA_FILE``."""
        base = url or env.get(URL_ENV, "")
        if not base:
            raise CliError(f"where is the sidecar? pass --url or set {URL_ENV}", USAGE)
        path = token_file or env.get(TOKEN_FILE_ENV, "")
        if path:
            try:
                lines = Path(path).read_text(encoding="utf-8").split()
            except OSError as exc:
                raise CliError(f"token file {path}: {exc.strerror or exc}", USAGE) from None
            token = lines[0] if lines else ""
        else:
            token = env.get(TOKEN_ENV, "")
        if not token:
            raise CliError(f"no token: set {TOKEN_ENV}, or {TOKEN_FILE_ENV} / --token-file", USAGE)
        return cls(base.rstrip("/"), token, ca_file or env.get(CA_FILE_ENV, ""))


class Sidecar:
    """Requests to the sidecar; each answer that is not a success raises :class:`CliError`."""

    def __init__(
        self, target: Target, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ):
        try:
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=target.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"CA file {target.ca_file}: {exc}", USAGE) from None
        self.url = target.url
        self._ca_file = target.ca_file
        self._http = httpx.Client(
            base_url=target.url,
            headers={"Authorization": f"Bearer {target.token}", "Accept": "application/json"},
            timeout=timeout,
            verify=verify,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def json(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> Any:
        """The answer's JSON; ``ok``: error codes whose JSON is an answer too (not a CliError)."""
        response = self._send(method, path, ok=ok, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"{method} {path}: the answer is not JSON (is {self.url} the sidecar?)", FAILED
            ) from None

    def raw(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._send("GET", path, **kwargs)

    def _send(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the sidecar at {self.url}: {self._why(exc)}", UNREACHABLE) from None
        if response.status_code < 400 or response.status_code in ok:
            return response
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        detail = f"HTTP {response.status_code}" + (f": {error}" if isinstance(error, str) else "")
        if response.status_code in (401, 403):
            raise CliError(f"the sidecar refused the token ({detail})", FAILED)
        code = NOT_FOUND if response.status_code == 404 else FAILED
        raise CliError(f"{method} {path}: {detail}", code)

    def _why(self, exc: httpx.HTTPError) -> str:
        """The error's type; for a certificate that did not verify, what to do about it (an https
        sidecar's certificate from a private CA needs that CA, which only the flag or variable gives)."""
        failed = _verify_failure(exc)
        if failed is None:
            return type(exc).__name__
        said = f"TLS certificate verify failed ({failed.verify_message or failed.reason})"
        if failed.verify_code in HOSTNAME_MISMATCH:
            return f"{said}: its certificate does not name the host in {self.url}; use a name it holds"
        if self._ca_file:
            return f"{said} against the CA file {self._ca_file}: pass the CA that signed its certificate"
        return (
            f"{said} against the system's CAs: if a private CA signed its certificate, "
            f"pass --ca-file with that CA's PEM file, or set {CA_FILE_ENV}"
        )


def _verify_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error under an HTTP error (httpx chains the ssl module's)."""
    seen: BaseException | None = exc
    for _ in range(10):  # bounded: a chain that leads back to itself must not hang the CLI
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def environment() -> Mapping[str, str]:
    return os.environ
