"""In-process stand-ins for Airflow (REST API v2) and for many agents, served from one process.

The Airflow stand-in implements what the reconciler uses, with Airflow 3.3's real paging rules:
list pages capped at 100 with keyset cursors, an uncapped batch endpoint, 404s with a JSON
``detail``. Each task instance is a copy of one recorded from a real Airflow 3.3.2 (the cassettes
under tests/cassettes), so answers have the real shape and size. Every request can be delayed by a
fixed latency. The agent stand-in answers like an agent and records when each stop arrives.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

CASSETTE = Path(__file__).resolve().parent.parent / "tests" / "cassettes" / "airflow-3.3.2" / "reads.yaml"
LIST_LIMIT = 100  # Airflow 3.3's [api] maximum_page_limit


def recorded_task_instance() -> dict[str, Any]:
    """One task instance exactly as a real Airflow 3.3.2 answered it."""
    cassette = yaml.safe_load(CASSETTE.read_text())
    for interaction in cassette["interactions"]:
        if interaction["request"]["uri"].endswith("/taskInstances/sleeper"):
            return dict(json.loads(interaction["response"]["body"]["string"]))
    raise RuntimeError(f"no recorded task instance in {CASSETTE}")


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class TaskInstanceRow:
    seq: int  # stands in for the UUID7 primary key: the keyset order
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    state: str | None
    try_number: int
    updated_at: float
    end_date: float | None = None


@dataclass
class AirflowStandIn:
    template: dict[str, Any]
    latency: float = 0.0
    rows: dict[tuple[str, str, str, int], TaskInstanceRow] = field(default_factory=dict)
    by_seq: list[TaskInstanceRow] = field(default_factory=list)
    requests: int = 0
    bytes_sent: int = 0
    # States only a direct read of one task instance sees yet: the poll's batch and list reads lag.
    direct_only: dict[tuple[str, str, str, int], str] = field(default_factory=dict)

    def add(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: int,
        state: str,
        try_number: int,
        *,
        age: float = 3600,
    ) -> None:
        """A task instance last updated ``age`` seconds ago (steady state: deferred long ago)."""
        row = TaskInstanceRow(
            len(self.by_seq), dag_id, run_id, task_id, map_index, state, try_number, time.time() - age
        )
        self.rows[(dag_id, run_id, task_id, map_index)] = row
        self.by_seq.append(row)

    def render(self, row: TaskInstanceRow) -> dict[str, Any]:
        return {
            **self.template,
            "id": f"{row.seq:032x}",
            "dag_id": row.dag_id,
            "dag_run_id": row.run_id,
            "task_id": row.task_id,
            "map_index": row.map_index,
            "state": row.state,
            "try_number": row.try_number,
            "end_date": iso(row.end_date) if row.end_date else None,
        }

    async def _answer(self, body: Any, status: int = 200) -> web.Response:
        if self.latency:
            await asyncio.sleep(self.latency)
        data = json.dumps(body).encode()
        self.requests += 1
        self.bytes_sent += len(data)
        return web.Response(body=data, status=status, content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return await self._answer({"metadatabase": {"status": "healthy"}})

    async def token(self, request: web.Request) -> web.Response:
        return await self._answer({"access_token": "stand-in", "token_type": "bearer"}, status=201)

    async def dags(self, request: web.Request) -> web.Response:
        return await self._answer({"dags": [], "total_entries": 0})

    async def list_changed(self, request: web.Request) -> web.Response:
        since = datetime.fromisoformat(request.query["updated_at_gte"].replace("Z", "+00:00")).timestamp()
        limit = min(int(request.query.get("limit", "50")), LIST_LIMIT)
        after = int(request.query["cursor"], 16) if request.query.get("cursor") else -1
        page: list[TaskInstanceRow] = []
        more = False
        for row in self.by_seq[after + 1 :]:
            if row.updated_at >= since:
                if len(page) == limit:
                    more = True
                    break
                page.append(row)
        next_cursor = f"{page[-1].seq:x}" if more and page else None
        return await self._answer(
            {
                "task_instances": [self.render(r) for r in page],
                "total_entries": len(page),
                "next_cursor": next_cursor,
                "previous_cursor": None,
            }
        )

    async def batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        dags, runs, tasks = (set(body.get(k) or []) for k in ("dag_ids", "dag_run_ids", "task_ids"))
        states = set(body["state"]) if body.get("state") is not None else None  # null: no state
        matched = [
            r
            for r in self.by_seq
            if (not dags or r.dag_id in dags)
            and (not runs or r.run_id in runs)
            and (not tasks or r.task_id in tasks)
            and (states is None or r.state in states)
        ]
        offset, limit = int(body.get("page_offset", 0)), int(body.get("page_limit", 100))  # 0: count only
        page = matched[offset : offset + limit]
        return await self._answer(
            {"task_instances": [self.render(r) for r in page], "total_entries": len(matched)}
        )

    async def one(self, request: web.Request) -> web.Response:
        m = request.match_info
        key = (m["dag_id"], m["run_id"], m["task_id"], int(m.get("map_index", -1)))
        row = self.rows.get(key)
        if row is None:
            return await self._answer({"detail": "The Task Instance was not found"}, status=404)
        return await self._answer({**self.render(row), "state": self.direct_only.get(key, row.state)})

    def flip(self, keys: list[tuple[str, str, str, int]], state: str) -> float:
        """What a person marking tasks does: new state, updated_at and end_date now."""
        now = time.time()
        for key in keys:
            row = self.rows[key]
            row.state, row.updated_at, row.end_date = state, now, now
        return now

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        prefix = "/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        app.router.add_get("/api/v2/monitor/health", self.health)
        app.router.add_post("/auth/token", self.token)
        app.router.add_get("/api/v2/dags", self.dags)
        app.router.add_get("/api/v2/dags/~/dagRuns/~/taskInstances", self.list_changed)
        app.router.add_post("/api/v2/dags/~/dagRuns/~/taskInstances/list", self.batch)
        app.router.add_get(prefix + "/{task_id}", self.one)
        app.router.add_get(prefix + "/{task_id}/{map_index}", self.one)
        return app


@dataclass
class AgentsStandIn:
    """Any number of agents behind one server: agent ``a`` lives under ``/agents/a``."""

    stops: dict[str, float] = field(default_factory=dict)  # job_id -> arrival (time.time())

    async def stop(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        self.stops.setdefault(job_id, time.time())
        return web.json_response(
            {
                "ok": True,
                "message": "stopped",
                "status": "FAILED",
                "rc": -15,
                "action": "terminated",
                "signal": "SIGTERM",
                "reason": "stand-in",
            }
        )

    async def job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        done = job_id in self.stops
        return web.json_response(
            {
                "job_id": job_id,
                "status": "FAILED" if done else "RUNNING",
                "pid": 1,
                "rc": -15 if done else None,
                "started_at": None,
                "finished_at": None,
                "reason": None,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/agents/{agent}/stop/{job_id}", self.stop)
        app.router.add_get("/agents/{agent}/jobs/{job_id}", self.job)
        return app
