"""Reads task-instance states from Airflow's stable REST API: v2 (Airflow 3) or v1 (Airflow 2).

Three reads, all parsed strictly:

- :meth:`AirflowClient.changed_since`: every task instance updated since a time (the cheap,
  incremental read of a steady-state cycle; keyset paging where v2 has it, offset paging otherwise);
- :meth:`AirflowClient.task_instance_pages` and :meth:`AirflowClient.count_task_instances`: the
  batch endpoint, by DAG, run and task ids and optionally by state (the targeted reads and the
  full resync);
- :meth:`AirflowClient.get_task_instance`: one task instance (the confirmation before a stop).

Anything the client cannot vouch for raises :class:`AirflowError`, which the loop turns into an
``Unknown`` observation: never a reason to stop a job.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from reconciler.airflow.task_instances import (
    AirflowError,
    TaskInstance,
    _is_int,
    parse_task_instance,
)

ApiVersion = Literal["v1", "v2"]
BATCH_PAGE = 1000  # the batch endpoints do not cap page_limit; 1000 keeps answers near 1 MB
LIST_PAGE_V2 = 100  # [api] maximum_page_limit caps v2 list pages at 100 by default
LIST_PAGE_V1 = 1000  # v1 (Airflow 2.11) does not cap list pages
MAX_STEP_BACKS = 20  # offset paging by id: a read that keeps finding rows moved gives up for this cycle


def iso_z(moment: datetime) -> str:
    """UTC ISO-8601 with a ``Z``: a ``+00:00`` in a query string could be read back as a space."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AirflowClient:
    """Airflow's REST API with v2's JWT (renewed on 401) or v1's basic auth.

    ``api_version="auto"`` asks Airflow's public health endpoints which API it serves, once.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_version: Literal["v1", "v2", "auto"] = "auto",
        username: str,
        password: str,
        timeout: float = 10.0,
        on_response: Callable[[str], None] = lambda code: None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._version: ApiVersion | None = None if api_version == "auto" else api_version
        self._username = username
        self._password = password
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._on_response = on_response  # metrics hook: called with the HTTP code or "error"
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._login: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        # Whether v2's list endpoint pages by keyset cursor (Airflow 3.0 and 3.1 do not). Assumed
        # until an answer says otherwise; every answer is checked, so an upgrade or a downgrade of
        # Airflow is noticed by the next read.
        self._keyset_paging = True
        self._count_page = 0  # page_limit of a count on v2: 0 (no rows) until Airflow refuses it
        self.requests = 0  # requests sent, for the benchmark's cost figures

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def api_version(self) -> ApiVersion:
        if self._version is None:
            for version, path in (("v2", "/api/v2/monitor/health"), ("v1", "/api/v1/health")):
                status, _ = await self._send("GET", path, None, {})
                if status == 200:
                    self._version = version  # type: ignore[assignment]
                    break
            else:
                raise AirflowError("cannot tell the API version: neither /api/v2 nor /api/v1 answers health")
        return self._version  # type: ignore[return-value]

    async def changed_since(self, since: datetime) -> list[TaskInstance]:
        """Every task instance (all DAGs, all runs) whose row changed at or after ``since``."""
        version = await self.api_version()
        path = f"/api/{version}/dags/~/dagRuns/~/taskInstances"
        params: dict[str, str] = {"updated_at_gte": iso_z(since)}
        if version == "v1":
            return await self._changed_by_offset(path, params)
        params |= {"limit": str(LIST_PAGE_V2), "order_by": "id"}
        if self._keyset_paging:
            return await self._changed_by_cursor(path, params)
        return await self._changed_by_id_offset(path, params)

    async def _changed_by_cursor(self, path: str, params: dict[str, str]) -> list[TaskInstance]:
        """Keyset paging: rows changing meanwhile cannot shift later pages."""
        found: list[TaskInstance] = []
        cursor = ""
        while True:
            page = await self._request("GET", path, params={**params, "cursor": cursor})
            if "next_cursor" not in page:
                # No keyset paging here (Airflow 3.0, 3.1): the cursor was ignored, so a first answer
                # is the first page of offset paging by id. Met later in a read (Airflow downgraded
                # meanwhile), the read starts over by offset: what this answer is cannot be told.
                self._keyset_paging = False
                first = None if cursor else page
                return await self._changed_by_id_offset(path, params, first=first)
            items, _ = _collection(page)
            found.extend(parse_task_instance(item) for item in items)
            cursor = page["next_cursor"]
            if not cursor or not items:
                return found
            if not isinstance(cursor, str):
                raise AirflowError("next_cursor is not a string")

    async def _changed_by_id_offset(
        self, path: str, params: dict[str, str], *, first: dict[str, Any] | None = None
    ) -> list[TaskInstance]:
        """Offset paging ordered by id, where Airflow has no keyset paging.

        No row that matters is skipped: ids are UUID7, time-ordered, so new rows and new tries (a
        new try gets a new id) sort last, and ``updated_at`` only grows, so rows only enter the
        window. A row entering before the offset pushes later ones back: a page may repeat rows
        already read, which is harmless (they are dropped). Only a row deleted, or moved to a new
        try's id, from before the offset pulls later ones forward past it; so each page starts on
        the last row of the page before, and one that does not start at or before that row is read
        again a page further back.
        """
        found: list[TaskInstance] = []
        last_id = ""  # the greatest id read so far
        offset, page, step_backs = 0, first, 0
        while True:
            if page is None:
                page = await self._request("GET", path, params={**params, "offset": str(offset)})
            if "next_cursor" in page:
                self._keyset_paging = True  # Airflow now pages by cursor: the next read uses it
            items, total = _collection(page)
            ids = [_task_instance_id(item) for item in items]
            if offset and (not ids or ids[0] > last_id):
                step_backs += 1  # in a row, without progress: a busy Airflow makes some, not a spiral
                if step_backs > MAX_STEP_BACKS:
                    raise AirflowError("task instances kept moving while they were read")
                offset, page = max(offset - LIST_PAGE_V2, 0), None
                continue
            step_backs = 0
            found.extend(
                parse_task_instance(item) for item, ti_id in zip(items, ids, strict=True) if ti_id > last_id
            )
            last_id = max(last_id, *ids) if ids else last_id
            # A page of one row holds only the last row read: nothing past it, whatever the count says.
            if len(items) < 2 or offset + len(items) >= total:
                return found
            offset, page = offset + len(items) - 1, None

    async def _changed_by_offset(self, path: str, params: dict[str, str]) -> list[TaskInstance]:
        """v1's offset paging in its default order (Airflow 2's task instances have no id)."""
        found: list[TaskInstance] = []
        offset = 0
        while True:
            page = await self._request(
                "GET", path, params={**params, "limit": str(LIST_PAGE_V1), "offset": str(offset)}
            )
            items, total = _collection(page)
            found.extend(parse_task_instance(item) for item in items)
            offset += len(items)
            if not items or offset >= total:
                return found

    async def list_task_instances(
        self, *, dag_ids: Iterable[str], run_ids: Iterable[str], task_ids: Iterable[str]
    ) -> list[TaskInstance]:
        """Task instances in these DAG runs with these task ids, all pages (the batch endpoint)."""
        pages = self.task_instance_pages(dag_ids=dag_ids, run_ids=run_ids, task_ids=task_ids)
        return [ti async for page in pages for ti in page]

    async def task_instance_pages(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None] | None = None,
    ) -> AsyncIterator[list[TaskInstance]]:
        """The batch endpoint's answer (task instances in any of these DAGs, runs and tasks, and in
        one of ``states`` if given; ``None`` is no state), one page at a time."""
        version = await self.api_version()
        body = _batch_filter(version, dag_ids, run_ids, task_ids, states) | {"page_limit": BATCH_PAGE}
        if version == "v2":
            body["order_by"] = "id"  # v1 refuses unknown fields; its default order is stable enough
        offset = 0
        while True:
            page = await self._request(
                "POST",
                f"/api/{version}/dags/~/dagRuns/~/taskInstances/list",
                json_body={**body, "page_offset": offset},
            )
            items, total = _collection(page)
            yield [parse_task_instance(item) for item in items]
            offset += len(items)
            if not items or offset >= total:
                return

    async def count_task_instances(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None],
    ) -> int:
        """How many task instances the batch endpoint would return, without their rows: v2 takes a
        page of none (Airflow 3.1 and 3.3 do; one that answers 422 gets pages of one from then on),
        v1 a page of one (its smallest)."""
        version = await self.api_version()
        body = _batch_filter(version, dag_ids, run_ids, task_ids, states)
        path = f"/api/{version}/dags/~/dagRuns/~/taskInstances/list"
        if version == "v2" and self._count_page == 0:
            try:
                return _collection(await self._request("POST", path, json_body={**body, "page_limit": 0}))[1]
            except AirflowError as exc:
                if exc.status != 422:
                    raise
                self._count_page = 1  # an Airflow that wants a page of at least one row
        page = await self._request("POST", path, json_body={**body, "page_limit": 1})
        return _collection(page)[1]

    async def get_task_instance(
        self, *, dag_id: str, run_id: str, task_id: str, map_index: int
    ) -> TaskInstance | None:
        """One task instance read directly; ``None`` when Airflow says it does not exist."""
        version = await self.api_version()
        path = f"/api/{version}/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}/taskInstances/{_seg(task_id)}"
        if map_index >= 0:
            path += f"/{map_index}"
        answer = await self._request("GET", path, absent_ok=True)
        return None if answer is None else parse_task_instance(answer)

    async def ping(self) -> None:
        """Raise :class:`AirflowError` unless the API answers an authenticated read."""
        version = await self.api_version()
        await self._request("GET", f"/api/{version}/dags", params={"limit": "1"})

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        absent_ok: bool = False,
    ) -> Any:
        for attempt in (1, 2):
            auth = await self._auth()
            status, payload = await self._send(method, path, json_body, auth, params)
            if status == 401 and attempt == 1 and self._version == "v2":
                # Expired or rotated JWT secret: log in again, once, unless a request that met the
                # same 401 at the same time already did (then its fresh token is used).
                if auth["Authorization"] == f"Bearer {self._token}":
                    self._token = None
                continue
            if status == 404 and absent_ok:
                # A 404 means "absent" only as Airflow's own JSON answer, not a proxy's page.
                if isinstance(payload, dict) and "detail" in payload:
                    if "is mapped" in str(payload["detail"]):
                        raise AirflowError("task instance is mapped but the job has no map_index")
                    return None
                raise AirflowError(f"{method} {path}: 404 without Airflow's JSON body", status=404)
            if status != 200:
                raise AirflowError(f"{method} {path}: HTTP {status}", status=status)
            if payload is _UNPARSEABLE or not isinstance(payload, dict):
                raise AirflowError(f"{method} {path}: answer is not a JSON object")
            return payload
        raise AirflowError(f"{method} {path}: still unauthorized after a fresh token")

    async def _auth(self) -> dict[str, str]:
        if self._version == "v1":
            pair = base64.b64encode(f"{self._username}:{self._password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        if self._token is None:
            async with self._login_lock():  # requests in flight at once share one login
                if self._token is None:
                    self._token = await self._fetch_token()
        return {"Authorization": f"Bearer {self._token}"}

    def _login_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._login is None or self._login[0] is not loop:
            self._login = (loop, asyncio.Lock())
        return self._login[1]

    async def _fetch_token(self) -> str:
        status, payload = await self._send(
            "POST", "/auth/token", {"username": self._username, "password": self._password}, {}
        )
        if status not in (200, 201):
            raise AirflowError(f"login as {self._username!r} failed: HTTP {status}")
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token:
            raise AirflowError("login answer has no access_token")
        return token

    async def _send(
        self, method: str, path: str, body: Any, headers: dict[str, str], params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        self.requests += 1
        try:
            async with self._session.request(
                method,
                self._base + path,
                json=body,
                params=params,
                headers={"Accept": "application/json", **headers},
            ) as resp:
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


def _batch_filter(
    version: ApiVersion,
    dag_ids: Iterable[str],
    run_ids: Iterable[str],
    task_ids: Iterable[str],
    states: Sequence[str | None] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dag_ids": sorted(set(dag_ids)),
        "dag_run_ids": sorted(set(run_ids)),
        "task_ids": sorted(set(task_ids)),
    }
    if states is not None:
        # "No state" is null in v2 and "none" in v1 (Airflow 2 maps that word to NULL).
        body["state"] = [s if s is not None or version == "v2" else "none" for s in states]
    return body


def _seg(value: str) -> str:
    return quote(value, safe="")


def _task_instance_id(raw: Any) -> str:
    ti_id = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(ti_id, str) or not ti_id:
        raise AirflowError("task instance lacks a string id")
    return ti_id


def _collection(page: Any) -> tuple[list[Any], int]:
    items, total = page.get("task_instances"), page.get("total_entries")
    if not isinstance(items, list) or not _is_int(total):
        raise AirflowError("task-instance list lacks task_instances/total_entries")
    return items, total
