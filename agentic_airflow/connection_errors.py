"""Why Airflow gave no connection: "not defined", or "could not be loaded" with Airflow's own error.

Airflow's ``get_connection`` asks each secrets backend in turn (the environment's ``AIRFLOW_CONN_*``, a
configured backend, the metadata DB or, on Airflow 3 workers, the API server), swallows what a backend
raises (a URI or JSON it cannot parse, a fernet it cannot build, a secrets backend's own error) and
then says the connection "isn't defined". :func:`first_failure` asks the same backends again, the
way Airflow does, to find the error it swallowed.

No Airflow import: the backends are handed in (duck-typed), so this is testable on its own.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from agentic_airflow.sidecar_client import MAX_ERROR_CHARS, SidecarError

# A URI's userinfo: everything up to the last "@" (a token with an unencoded "/" or "@" included).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)\S*@")
# A secret-looking key and its value, as JSON, a dict's repr, a query string or keyword arguments say it.
_SECRET_FIELD = re.compile(
    r"""(?ix)
    (\b\w*(?:password|passwd|passphrase|secret|token|api_?key|authorization|private_key)\w*["']?\s*[:=]\s*)
    ("(?:\\.|[^"\\])*"?|'(?:\\.|[^'\\])*'?|(?:bearer\s+)?[^\s,;&)}\]]+)
    """
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)\S+")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without what may be a credential: each of ``secrets`` where it stands as a whole word, a
    URI's userinfo, a secret-looking field's value, a bearer token. Airflow's errors may quote what they
    could not parse (``Invalid connection string: <the URI>``), token included; the connection's own
    password is unknown when it did not parse."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    text = _USERINFO.sub(r"\1***@", text)
    text = _SECRET_FIELD.sub(r"\1***", text)
    return _BEARER.sub(r"\1***", text)


def env_secrets(conn_id: str) -> list[str]:
    """What may be a credential in ``AIRFLOW_CONN_<ID>``, as the parts an error may quote: a URI's whole
    userinfo and each piece of it (a token with an unencoded ``/``, ``?`` or ``#`` is cut there by URI
    parsing, and Airflow's error then quotes a piece, e.g. as the port), or a JSON connection's
    password and login."""
    raw = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}", "").strip()
    if raw.startswith("{"):
        try:
            fields = json.loads(raw)
        except ValueError:
            fields = {}
        found = [str(fields.get(k) or "") for k in ("password", "login")] if isinstance(fields, dict) else []
    else:
        found = [raw.partition("://")[2].rpartition("@")[0]]
    return [piece for secret in found for piece in {secret, *re.split(r"[:/?#@]", secret)} if piece]


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """``Type: message`` of Airflow's error: redacted, its first line only (a database error goes on
    with the SQL), at most MAX_ERROR_CHARS."""
    lines = [line.strip() for line in redact(str(exc), secrets).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def not_defined(conn_id: str) -> SidecarError:
    return SidecarError(f"the connection {conn_id} is not defined")


def not_loaded(conn_id: str, exc: BaseException, source: str = "") -> SidecarError:
    """``source``: the secrets backend that raised ``exc``, when known."""
    text = f"the connection {conn_id} could not be loaded: {describe(exc, env_secrets(conn_id))}"
    if source == "EnvironmentVariablesBackend":  # name the variable: that is where a person fixes it
        return SidecarError(f"{text} (read by Airflow's {source} from AIRFLOW_CONN_{conn_id.upper()})")
    return SidecarError(f"{text} (read by Airflow's {source})" if source else text)


@dataclass(frozen=True)
class LoadFailure:
    source: str  # the secrets backend's class name
    error: Exception

    def as_error(self, conn_id: str) -> SidecarError:
        return not_loaded(conn_id, self.error, self.source)


def first_failure(conn_id: str, backends: Iterable[Any]) -> LoadFailure | None:
    """What the first backend that failed raised, each read as Airflow reads it (the connection, then
    its URI, which decrypts the password), in Airflow's order; None when none failed (the connection
    is not defined) or one has it now."""
    for backend in backends:
        try:
            conn = backend.get_connection(conn_id)
            if conn:
                conn.get_uri()
                return None  # found now, as Airflow would have used it: nothing failed this time
        except Exception as exc:
            return LoadFailure(type(backend).__name__, exc)
    return None


async def afirst_failure(
    conn_id: str, backends: Iterable[Any], in_thread: Callable[[Callable[[], Any]], Awaitable[Any]]
) -> LoadFailure | None:
    """:func:`first_failure` as Airflow's async read does it (Airflow >= 3.1, in the triggerer's event
    loop): a backend's ``aget_connection`` when it has one, its ``get_connection`` through
    ``in_thread`` otherwise."""
    for backend in backends:
        try:
            read = getattr(backend, "aget_connection", None)
            if read is not None:
                conn = read(conn_id)
                conn = await conn if inspect.isawaitable(conn) else conn
            else:
                conn = await in_thread(partial(backend.get_connection, conn_id))
            if conn:
                aget_uri = getattr(conn, "aget_uri", None)
                await aget_uri() if aget_uri is not None else conn.get_uri()
                return None
        except Exception as exc:
            return LoadFailure(type(backend).__name__, exc)
    return None
