"""Resolve the sidecar's address and token from an Airflow connection (Airflow 3 and 2).

Any connection type works: ``agentic_run`` (:class:`agentic_airflow.hooks.AgenticRunHook`'s, with its
form), ``http`` or ``https``; :meth:`SidecarEndpoint.from_connection` reads them all the same way.

A connection Airflow has not is "not defined"; one it has but cannot load (a URI or JSON it cannot
parse, a fernet it cannot build, a secrets backend's error) "could not be loaded", with Airflow's
error (see :mod:`agentic_airflow.connection_errors`). Either is a :class:`SidecarError`, without the
token, and without Airflow's exception chained: its text may quote the connection, token included.
"""

from __future__ import annotations

from typing import Any

from airflow.exceptions import AirflowNotFoundException

from agentic_airflow.connection_errors import afirst_failure, first_failure, not_defined, not_loaded
from agentic_airflow.sidecar_client import SidecarEndpoint, SidecarError, sidecar_address

try:  # Airflow 3
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 2
    from airflow.hooks.base import BaseHook

DEFAULT_CONN_ID = "agentic_run_default"


def _backends() -> list[Any]:
    """The secrets backends Airflow's ``get_connection`` asks, in its order."""
    try:  # Airflow 3: the chain of this process's context (a task's, the triggerer's, ...)
        from airflow.sdk.execution_time.supervisor import ensure_secrets_backend_loaded
    except ImportError:  # Airflow 2
        from airflow.configuration import ensure_secrets_loaded

        return list(ensure_secrets_loaded())
    return list(ensure_secrets_backend_loaded())


def _not_found(conn_id: str) -> SidecarError:
    """Airflow says "isn't defined" also when a backend failed (it swallows the error): ask again."""
    try:
        failure = first_failure(conn_id, _backends())
    except Exception:  # asking again is a diagnosis: it never hides Airflow's own answer
        failure = None
    return failure.as_error(conn_id) if failure is not None else not_defined(conn_id)


async def _anot_found(conn_id: str) -> SidecarError:
    from asgiref.sync import sync_to_async

    try:
        failure = await afirst_failure(conn_id, _backends(), lambda call: sync_to_async(call)())
    except Exception:
        failure = None
    return failure.as_error(conn_id) if failure is not None else not_defined(conn_id)


def _endpoint(conn_id: str, conn: Any) -> SidecarEndpoint:
    try:
        return SidecarEndpoint.from_connection(
            conn_type=conn.conn_type,
            host=conn.host,
            port=conn.port,
            password=conn.password,
            extra=conn.extra_dejson,
        )
    except SidecarError:
        raise
    except Exception as exc:  # a field Airflow cannot read (a password it cannot decrypt)
        raise not_loaded(conn_id, exc) from None


def get_connection(conn_id: str) -> Any:
    """The Airflow connection; :class:`SidecarError` when it is not defined or cannot be loaded."""
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise _not_found(conn_id) from None
    except Exception as exc:
        raise not_loaded(conn_id, exc) from None


def get_endpoint(conn_id: str) -> SidecarEndpoint:
    return _endpoint(conn_id, get_connection(conn_id))


def get_base_url(conn_id: str) -> str:
    """The sidecar's base URL alone: what a link shows, so a connection without a token has one too."""
    conn = get_connection(conn_id)
    try:
        extra = conn.extra_dejson
        return sidecar_address(conn_type=conn.conn_type, host=conn.host, port=conn.port, extra=extra)
    except SidecarError:
        raise
    except Exception as exc:
        raise not_loaded(conn_id, exc) from None


async def aget_endpoint(conn_id: str) -> SidecarEndpoint:
    """The endpoint, read afresh (a rotated token is seen). Raises :class:`SidecarError` for a
    connection that is missing, cannot be loaded or is incomplete."""
    if not hasattr(BaseHook, "aget_connection"):  # Airflow < 3.1: the sync read, off the event loop
        from asgiref.sync import sync_to_async

        return _endpoint(conn_id, await sync_to_async(get_connection)(conn_id))
    try:  # Airflow >= 3.1: safe inside the triggerer's event loop
        conn = await BaseHook.aget_connection(conn_id)
    except AirflowNotFoundException:
        raise await _anot_found(conn_id) from None
    except Exception as exc:
        raise not_loaded(conn_id, exc) from None
    return _endpoint(conn_id, conn)
