"""Resolve the sidecar's address and token from an Airflow connection (Airflow 3 and 2)."""

from __future__ import annotations

from typing import Any

from agentic_airflow.sidecar import SidecarEndpoint

try:  # Airflow 3
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 2
    from airflow.hooks.base import BaseHook


def _endpoint(conn: Any) -> SidecarEndpoint:
    return SidecarEndpoint.from_connection(
        conn_type=conn.conn_type,
        host=conn.host,
        port=conn.port,
        password=conn.password,
        extra=conn.extra_dejson,
    )


def get_endpoint(conn_id: str) -> SidecarEndpoint:
    return _endpoint(BaseHook.get_connection(conn_id))


async def aget_endpoint(conn_id: str) -> SidecarEndpoint:
    if hasattr(BaseHook, "aget_connection"):  # Airflow >= 3.1: safe inside the triggerer's event loop
        return _endpoint(await BaseHook.aget_connection(conn_id))
    from asgiref.sync import sync_to_async

    return _endpoint(await sync_to_async(BaseHook.get_connection)(conn_id))
