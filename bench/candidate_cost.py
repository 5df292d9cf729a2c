"""What each candidate read costs a real api-server and its PostgreSQL, beside today's reads.

The candidates (bench.candidate_bodies) are POSTed to Airflow's batch endpoint as they are; today's
reads (incremental, batch) go through the reconciler's own client as bench.read_cost sends them, and
so do the default strategy's (``reconciler.core.targeted.TargetedRead``: a steady cycle, a chunk of its
rolling full check).
Every read's statements come from PostgreSQL's log and its ``task_instance`` statements are re-run
under ``EXPLAIN (ANALYZE, BUFFERS)`` (bench.explain).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg

from bench.airflow_db_fill import Layout
from bench.candidate_bodies import Scope, deferred_count, one_dag, transient_rows
from bench.explain import is_ti_read
from bench.metadata_db import connect, ti_indexes, touch
from bench.pg_capture import ServerLog
from bench.read_cost import READ_TIMEOUT, Case, Reads, measure, say
from harness.airflow import PASSWORD, USERNAME
from reconciler.airflow.client import AirflowClient
from reconciler.airflow.task_instances import TaskInstancePath
from reconciler.config import PollConfig
from reconciler.core.targeted import CHECK_KEYS, TargetedRead
from reconciler.core.watched import Watched, id_lists
from router_db import JobRecord, JobStatus, TaskInstanceKey

BATCH = "/api/v2/dags/~/dagRuns/~/taskInstances/list"


class BatchEndpoint:
    """Airflow 3's batch endpoint, logged in as ``reconciler.airflow.client.AirflowClient`` logs in (v2's JWT
    from ``POST /auth/token``, fetched again once on a 401)."""

    def __init__(self, url: str, *, username: str = USERNAME, password: str = PASSWORD) -> None:
        self._url = url.rstrip("/")
        self._login = {"username": username, "password": password}
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT))
        self._token: str | None = None
        self.requests = 0  # HTTP requests sent to the batch endpoint (logins not counted)

    async def close(self) -> None:
        await self._session.close()

    async def post(self, body: dict[str, Any]) -> tuple[int, int]:
        """(rows returned, ``total_entries``) of one request."""
        for _ in (1, 2):
            if self._token is None:
                async with self._session.post(self._url + "/auth/token", json=self._login) as resp:
                    resp.raise_for_status()
                    self._token = str((await resp.json())["access_token"])
            self.requests += 1
            headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
            async with self._session.post(self._url + BATCH, json=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status == 401:
                    self._token = None
                    continue
                if resp.status != 200:
                    raise RuntimeError(f"POST {BATCH}: HTTP {resp.status}: {raw[:300]!r}")
            page = json.loads(raw)
            return len(page["task_instances"]), int(page["total_entries"])
        raise RuntimeError(f"POST {BATCH}: still unauthorized after a fresh token")


@dataclass
class Candidate(Case):
    """A measured read with the ``total_entries`` Airflow answered, and the requests one read makes."""

    totals: list[int] = field(default_factory=list)
    audit_rows: float = 0.0  # rows Airflow wrote to its audit table ``log`` per read
    audit_bytes: float = 0.0  # their size per read (``pg_column_size`` of the rows)

    @property
    def per_read(self) -> int:
        return int(self.requests[0]) if self.requests else 1

    @property
    def ti_sql_ms(self) -> float:
        """Median SQL time of the read's statements on ``task_instance``; the rest is per-request overhead."""
        return statistics.median(sum(s.ms for s in run if is_ti_read(s)) for run in self.runs)


# name -> what it is; the order of the tables
READS = {
    "R1 transient rows": "tracked keys, `state` in (null, scheduled, queued, running, up_for_retry, "
    "up_for_reschedule, restarting), `order_by` id, `page_limit` 1000",
    "R2 deferred count": "tracked keys, `state` = deferred, `page_limit` 0 (count only)",
    "R3 one DAG": "one DAG's tracked keys, every state, `order_by` id, `page_limit` 1000",
    "R3 all DAGs": "R3 for every tracked DAG, one after another (a whole full check)",
    "targeted cycle (default)": "one steady cycle of the default strategy, `TargetedRead.read` of the "
    "tracked jobs through the reconciler's client: R1's rows (pages of 1000) and R2's count, sent at once "
    "(TIs returned: the observations it hands the loop, none when all tracked TIs are deferred)",
    "check chunk (default)": f"one request of the default's rolling full check: the tracked keys of "
    f"consecutive runs (by DAG id, run id) up to >= {CHECK_KEYS:,} keys, every state, `order_by` id, "
    "pages of 1000 (the reconciler's client)",
    "incremental (today)": "`updated_at_gte` = now - 11 s, cursor pages of 100 (the reconciler's client)",
    "batch (today)": "every tracked key, pages of 1000 (the reconciler's client; today's full resync)",
}


@dataclass
class Scoped:
    """One tracked-jobs scope measured on one database."""

    scope: Scope
    cases: dict[str, Candidate]
    loadavg: tuple[float, float]  # 1-minute load average when its reads began and ended


def jobs_of(scope: Scope) -> list[JobRecord]:
    """The tracked keys as the sidecar's live jobs (running, try 1, no identity)."""
    now = datetime.now(UTC)
    return [
        JobRecord(
            job_id=f"bench-{i}",
            key=TaskInstanceKey(dag_id=d, task_id=t, run_id=r, map_index=m, try_number=1),
            agent_id="bench",
            command="true",
            status=JobStatus.RUNNING,
            rc=None,
            reason=None,
            stop_status=None,
            created_at=now,
            updated_at=now,
            stop_requested_at=None,
            finished_at=None,
        )
        for i, (d, r, t, m) in enumerate(scope.keys)
    ]


def check_chunks(live: Sequence[JobRecord]) -> list[list[TaskInstancePath]]:
    """The requests of one round of the rolling full check, grouped as ``TargetedRead._check`` groups
    them: whole runs in (dag_id, run_id) order, a group closed once it holds >= CHECK_KEYS keys."""
    watched = Watched()
    watched.update(live)
    chunks: list[list[TaskInstancePath]] = [[]]
    for run in sorted(watched.by_run):
        if len(chunks[-1]) >= CHECK_KEYS:
            chunks.append([])
        chunks[-1] += watched.keys([run])
    return chunks


def last_audit(conn: psycopg.Connection) -> int:
    """The newest row of Airflow's audit table ``log`` (every POST to the API writes one, body included)."""
    row = conn.execute("SELECT coalesce(max(id), 0) FROM log").fetchone()
    return int(row[0]) if row else 0


def audit_since(conn: psycopg.Connection, after: int) -> tuple[int, int]:
    """(rows, bytes) the API wrote to ``log`` since row ``after``."""
    row = conn.execute(
        "SELECT count(*), coalesce(sum(pg_column_size(log.*)), 0) FROM log WHERE id > %s", (after,)
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def measure_scope(
    url: str,
    db: str,
    log: ServerLog,
    layout: Layout,
    poll: PollConfig,
    scope: Scope,
    repeats: int,
    heavy_repeats: int,
) -> Scoped:
    """Every read for ``scope``, statements captured, then EXPLAIN ANALYZE of each read's first run."""
    began = os.getloadavg()[0]
    conn = connect(db)
    heartbeat = touch(conn, layout)  # the running TIs heartbeat before every read, as in bench.read_cost
    endpoint = BatchEndpoint(url)
    client = AirflowClient(url, api_version="v2", username=USERNAME, password=PASSWORD, timeout=READ_TIMEOUT)
    lag = timedelta(seconds=poll.interval_seconds + poll.overlap_seconds)
    reads = Reads(client, scope.keys, lag, iter([]), poll.max_concurrent_reads)
    cases = {name: Candidate(name, what) for name, what in READS.items()}
    dags = itertools.cycle(scope.dags)
    live = jobs_of(scope)
    chunks = itertools.cycle(check_chunks(live))
    targeted = TargetedRead(
        client, full_check_seconds=poll.full_resync_seconds, concurrency=poll.max_concurrent_reads
    )

    async def r1() -> int:
        rows, total = await endpoint.post(transient_rows(scope))
        cases["R1 transient rows"].totals.append(total)
        return rows

    async def r2() -> int:
        rows, total = await endpoint.post(deferred_count(scope))
        cases["R2 deferred count"].totals.append(total)
        return rows

    async def r3_one() -> int:
        rows, total = await endpoint.post(one_dag(scope, next(dags)))
        cases["R3 one DAG"].totals.append(total)
        return rows

    async def r3_all() -> int:
        found = 0
        for dag_id in scope.dags:
            found += (await endpoint.post(one_dag(scope, dag_id)))[0]
        return found

    async def cycle() -> int:
        found, read = await targeted.read(live)
        if found or read != "targeted":  # every tracked TI is deferred: a steady cycle finds nothing
            raise RuntimeError(f"not a steady targeted cycle: {read}, {len(found)} observations")
        return len(found)

    async def chunk() -> int:
        pages = client.task_instance_pages(**id_lists(next(chunks)), states=None)
        return sum([len(page) async for page in pages])

    try:
        heartbeat()
        for warm in (r1, r2, r3_one, reads.incremental, chunk):  # pools, imports, tokens
            await warm()
        found, _ = await targeted.read(live)  # the first read also sends a chunk of the full check
        if found:
            raise RuntimeError(f"the first targeted read observed {len(found)} diverging jobs")
        targeted._next_check = float("inf")  # measured reads: steady cycles only (R1 + R2)
        c = cases
        for name, read, n, sender in (
            ("R1 transient rows", r1, repeats, endpoint),
            ("R2 deferred count", r2, repeats, endpoint),
            ("R3 one DAG", r3_one, repeats, endpoint),
            ("R3 all DAGs", r3_all, heavy_repeats, endpoint),
            ("targeted cycle (default)", cycle, repeats, client),
            ("check chunk (default)", chunk, repeats, client),
            ("incremental (today)", reads.incremental, min(repeats, 5), client),
            ("batch (today)", reads.batch, heavy_repeats, client),
        ):
            say(f"  {scope.name}: {name} x{n}")
            started, audited = time.monotonic(), last_audit(conn)
            await measure(c[name], read, n, sender, log, db, heartbeat)
            rows, size = audit_since(conn, audited)
            c[name].audit_rows, c[name].audit_bytes = rows / n, size / n
            say(f"    {time.monotonic() - started:.1f} s")
        c["R1 transient rows"].totals = c["R1 transient rows"].totals[1:]  # drop the warm-up's
        c["R2 deferred count"].totals = c["R2 deferred count"].totals[1:]
        c["R3 one DAG"].totals = c["R3 one DAG"].totals[1:]
        indexes = {name for name, _ in ti_indexes(conn)}
        say(f"  {scope.name}: EXPLAIN ANALYZE")
        heartbeat()
        for case in c.values():
            case.explain(conn, indexes)
        return Scoped(scope, cases, (began, os.getloadavg()[0]))
    finally:
        await endpoint.close()
        await client.close()
        conn.close()
