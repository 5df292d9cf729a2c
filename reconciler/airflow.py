"""Reads task-instance states from Airflow's stable REST API (v2, Airflow 3).

Every answer is parsed strictly. Anything the client cannot vouch for raises :class:`AirflowError`,
which the loop turns into an ``Unknown`` observation: never a reason to stop a job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp

PAGE_LIMIT = 1000  # the batch endpoint does not cap page_limit; 1000 keeps answers near 1 MB


class AirflowError(Exception):
    """Airflow gave no usable answer. Messages never carry credentials."""


@dataclass(frozen=True)
class TaskInstance:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    state: str | None
    try_number: int
    end_date: datetime | None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


def parse_task_instance(raw: Any) -> TaskInstance:
    """One task instance from Airflow's JSON, or :class:`AirflowError` if it is not one."""
    if not isinstance(raw, dict):
        raise AirflowError("task instance is not an object")
    try:
        dag_id, run_id, task_id = raw["dag_id"], raw["dag_run_id"], raw["task_id"]
        map_index, state, try_number = raw["map_index"], raw["state"], raw["try_number"]
        end_date = raw.get("end_date")
    except KeyError as exc:
        raise AirflowError(f"task instance lacks field {exc.args[0]!r}") from None
    if not all(isinstance(v, str) for v in (dag_id, run_id, task_id)):
        raise AirflowError("task instance ids are not strings")
    if not _is_int(map_index) or not _is_int(try_number):
        raise AirflowError("task instance map_index/try_number are not integers")
    if state is not None and not isinstance(state, str):
        raise AirflowError("task instance state is not a string")
    return TaskInstance(dag_id, run_id, task_id, map_index, state, try_number, _parse_time(end_date))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise AirflowError("task instance end_date is not a string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise AirflowError("task instance end_date is not ISO-8601") from None
    return parsed if parsed.tzinfo is not None else None


class AirflowClient:
    """Airflow 3 REST API v2 with a JWT from ``/auth/token``, renewed when Airflow answers 401."""

    def __init__(
        self,
        base_url: str,
        *,
        username: str,
        password: str,
        timeout: float = 10.0,
        on_response: Callable[[str], None] = lambda code: None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._username = username
        self._password = password
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._on_response = on_response  # metrics hook: called with the HTTP code or "error"
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_task_instances(
        self, *, dag_ids: Iterable[str], run_ids: Iterable[str], task_ids: Iterable[str]
    ) -> list[TaskInstance]:
        """Task instances in these DAG runs with these task ids, all pages, in one logical read."""
        body: dict[str, Any] = {
            "dag_ids": sorted(set(dag_ids)),
            "dag_run_ids": sorted(set(run_ids)),
            "task_ids": sorted(set(task_ids)),
            "page_limit": PAGE_LIMIT,
            "order_by": "id",
        }
        found: list[TaskInstance] = []
        offset = 0
        while True:
            page = await self._request(
                "POST",
                "/api/v2/dags/~/dagRuns/~/taskInstances/list",
                json_body={**body, "page_offset": offset},
            )
            items, total = _collection(page)
            found.extend(parse_task_instance(item) for item in items)
            offset += len(items)
            if not items or offset >= total:
                return found

    async def get_task_instance(
        self, dag_id: str, run_id: str, task_id: str, map_index: int
    ) -> TaskInstance | None:
        """One task instance read directly; ``None`` when Airflow says it does not exist."""
        path = f"/api/v2/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}/taskInstances/{_seg(task_id)}"
        if map_index >= 0:
            path += f"/{map_index}"
        answer = await self._request("GET", path, absent_ok=True)
        return None if answer is None else parse_task_instance(answer)

    async def ping(self) -> None:
        """Raise :class:`AirflowError` unless the API answers an authenticated read."""
        await self._request("GET", "/api/v2/dags?limit=1")

    async def _request(
        self, method: str, path: str, *, json_body: Any = None, absent_ok: bool = False
    ) -> Any:
        for attempt in (1, 2):
            if self._token is None:
                self._token = await self._fetch_token()
            status, payload = await self._send(method, path, json_body, self._token)
            if status == 401 and attempt == 1:
                self._token = None  # expired or rotated secret: log in again once
                continue
            if status == 404 and absent_ok:
                # A 404 means "absent" only if it is Airflow's own JSON answer, not a proxy page.
                if isinstance(payload, dict) and "detail" in payload:
                    detail = str(payload["detail"])
                    if "is mapped" in detail:
                        raise AirflowError("task instance is mapped but the job has no map_index")
                    return None
                raise AirflowError(f"{method} {path}: 404 without Airflow's JSON body")
            if status != 200:
                raise AirflowError(f"{method} {path}: HTTP {status}")
            if payload is _UNPARSEABLE:
                raise AirflowError(f"{method} {path}: answer is not JSON")
            return payload
        raise AirflowError(f"{method} {path}: still unauthorized after a fresh token")

    async def _fetch_token(self) -> str:
        status, payload = await self._send(
            "POST", "/auth/token", {"username": self._username, "password": self._password}, None
        )
        if status not in (200, 201):
            raise AirflowError(f"login as {self._username!r} failed: HTTP {status}")
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token:
            raise AirflowError("login answer has no access_token")
        return token

    async def _send(self, method: str, path: str, body: Any, token: str | None) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._session.request(method, self._base + path, json=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._on_response("error")
            raise AirflowError(f"{method} {path}: {type(exc).__name__}") from None
        self._on_response(str(status))
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, _UNPARSEABLE


_UNPARSEABLE: Any = object()


def _seg(value: str) -> str:
    return quote(value, safe="")


def _collection(page: Any) -> tuple[list[Any], int]:
    if not isinstance(page, dict):
        raise AirflowError("task-instance list is not an object")
    items, total = page.get("task_instances"), page.get("total_entries")
    if not isinstance(items, list) or not isinstance(total, int) or isinstance(total, bool):
        raise AirflowError("task-instance list lacks task_instances/total_entries")
    return items, total
