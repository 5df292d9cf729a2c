"""Resolve the sidecar's address and token from an Airflow connection (Airflow 3 and 2).

Any connection type works: ``agentic_run`` (:class:`agentic_airflow.hooks.AgenticRunHook`'s, with its
form), ``http`` or ``https``; :meth:`SidecarEndpoint.from_connection` reads them all the same way.
"""

from __future__ import annotations

from typing import Any

from airflow.exceptions import AirflowNotFoundException

from agentic_airflow.sidecar_client import SidecarEndpoint, SidecarError, sidecar_address

try:  # Airflow 3
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 2
    from airflow.hooks.base import BaseHook

DEFAULT_CONN_ID = "agentic_run_default"


def _endpoint(conn: Any) -> SidecarEndpoint:
    return SidecarEndpoint.from_connection(
        conn_type=conn.conn_type,
        host=conn.host,
        port=conn.port,
        password=conn.password,
        extra=conn.extra_dejson,
    )


def _undefined(conn_id: str) -> SidecarError:
    return SidecarError(f"the connection {conn_id} is not defined")


def get_connection(conn_id: str) -> Any:
    """The Airflow connection; :class:`SidecarError` when it is not defined."""
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise _undefined(conn_id) from None


def get_endpoint(conn_id: str) -> SidecarEndpoint:
    return _endpoint(get_connection(conn_id))


def get_base_url(conn_id: str) -> str:
    """The sidecar's base URL alone: what a link shows, so a connection without a token has one too."""
    conn = get_connection(conn_id)
    return sidecar_address(conn_type=conn.conn_type, host=conn.host, port=conn.port, extra=conn.extra_dejson)


async def aget_endpoint(conn_id: str) -> SidecarEndpoint:
    """The endpoint, read afresh (a rotated token is seen). Raises :class:`SidecarError` for a
    connection that is missing or incomplete; whatever a secrets backend raises otherwise."""
    try:
        if hasattr(BaseHook, "aget_connection"):  # Airflow >= 3.1: safe inside the triggerer's event loop
            conn = await BaseHook.aget_connection(conn_id)
        else:
            from asgiref.sync import sync_to_async

            conn = await sync_to_async(BaseHook.get_connection)(conn_id)
    except AirflowNotFoundException:
        raise _undefined(conn_id) from None
    return _endpoint(conn)
