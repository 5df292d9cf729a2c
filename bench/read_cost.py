"""The reconciler's reads against a real api-server, what each one cost, and Airflow's load per second.

Every read goes through the reconciler's own client (``reconciler.airflow.client.AirflowClient``) with the
sidecar's poll settings (``reconciler.config.PollConfig``). A logged phase captures the SQL of each
read from PostgreSQL's log and EXPLAINs it; a quiet phase, on an api-server whose connections log
nothing, measures latency only.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import psycopg

from bench.airflow_db_fill import Layout
from bench.explain import Explained, explain_read
from bench.metadata_db import active_keys, connect, ti_indexes, touch
from bench.pg_capture import ServerLog, Statement
from harness.airflow import PASSWORD, USERNAME
from reconciler.airflow.client import AirflowClient
from reconciler.airflow.task_instances import AirflowError
from reconciler.config import PollConfig

INDEX = "bench_ti_updated_at"  # the index Airflow does not ship, added for the comparison
# Far above the sidecar's request timeout: a slow read at a million task instances is measured, not cut.
READ_TIMEOUT = 600.0

Key = tuple[str, str, str, int]


class Counting(Protocol):
    """A client that counts the HTTP requests it sends."""

    requests: int


def say(msg: str) -> None:
    """Progress, on stderr: stdout carries the report."""
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sampling:
    repeats: int  # measured incremental reads (confirm: 3x)
    heavy_repeats: int  # measured batch reads
    naive_sample: int  # single reads for the naive figure


@dataclass
class Case:
    name: str
    strategy: str  # where the reconciler sends this read
    latencies: list[float] = field(default_factory=list)  # statement logging on
    quiet: list[float] = field(default_factory=list)  # statement logging off (second api-server)
    requests: list[int] = field(default_factory=list)
    returned: list[int] = field(default_factory=list)
    runs: list[list[Statement]] = field(default_factory=list)  # statements per measured read
    plans: Explained = field(default_factory=list)  # first read's task_instance statements
    others: Explained = field(default_factory=list)  # one per other shape
    errors: list[str] = field(default_factory=list)  # failed requests (naive samples), both runs
    asked: int = 0  # reads attempted in the naive samples, both runs

    @property
    def latency(self) -> float:
        """Median end-to-end seconds per read, in the logged run (the run the SQL figures come from)."""
        return statistics.median(self.latencies)

    @property
    def sql_ms(self) -> float:
        return statistics.median(sum(s.ms for s in run) for run in self.runs)

    @property
    def rows_examined(self) -> int:
        return sum(p.rows_examined for _, p in self.plans)

    @property
    def ti_explain_ms(self) -> float:
        return sum(p.execution_ms for _, p in self.plans)

    def explain(self, conn: psycopg.Connection, indexes: set[str]) -> None:
        """EXPLAIN ANALYZE the statements of the first measured read."""
        self.plans, self.others = explain_read(conn, self.runs[0], indexes)


def cases_for(poll: PollConfig) -> dict[str, Case]:
    """The reads measured, by name, each with the strategy that uses it."""
    strategies = {
        "incremental": "`incremental`, every cycle",
        "incremental + index": "`incremental`, if `updated_at` were indexed",
        "batch": "`batch` every cycle; `incremental`'s full resync",
        "batch per DAG": "the same keys, one batch request per DAG, sequentially (an alternative)",
        "confirm": "confirmation of each stop; `naive` (one per job)",
        "naive sample": f"`naive`: single reads, {poll.max_concurrent_reads} in flight as the loop does",
        "naive sample, 4 in flight": "the same, 4 in flight",
    }
    return {name: Case(name, strategy) for name, strategy in strategies.items()}


async def measure(
    case: Case,
    read: Callable[[], Awaitable[int]],
    repeats: int,
    client: Counting,
    log: ServerLog | None,
    db: str,
    before: Callable[[], None] = lambda: None,
) -> None:
    """``repeats`` reads; with ``log`` the statements each ran, else only the latency (``quiet``)."""
    for _ in range(repeats):
        before()
        await asyncio.sleep(0.05)
        if log is not None:
            log.mark()
        sent = client.requests
        started = time.perf_counter()
        returned = await read()
        elapsed = time.perf_counter() - started
        if log is None:
            case.quiet.append(elapsed)
            continue
        case.latencies.append(elapsed)
        case.requests.append(client.requests - sent)
        case.returned.append(returned)
        await asyncio.sleep(0.3)  # each statement is logged before its answer is sent; margin only
        case.runs.append(log.statements(db))


@dataclass
class Reads:
    """The reconciler's reads, through its own client."""

    client: AirflowClient
    keys: list[Key]
    lag: timedelta  # interval + overlap: how far back an incremental read asks
    picks: Iterator[Key]
    concurrency: int  # direct reads in flight at once, as the loop sends them
    errors: list[str] = field(default_factory=list)  # naive reads Airflow did not answer

    async def incremental(self) -> int:
        return len(await self.client.changed_since(datetime.now(UTC) - self.lag))

    async def batch(self) -> int:
        keys = self.keys
        return len(
            await self.client.list_task_instances(
                dag_ids={k[0] for k in keys}, run_ids={k[1] for k in keys}, task_ids={k[2] for k in keys}
            )
        )

    async def batch_per_dag(self) -> int:
        """The same keys, one batch request per DAG (not what the reconciler does today)."""
        by_dag: dict[str, list[Key]] = {}
        for key in self.keys:
            by_dag.setdefault(key[0], []).append(key)
        found = 0
        for dag_id, keys in sorted(by_dag.items()):
            found += len(
                await self.client.list_task_instances(
                    dag_ids={dag_id}, run_ids={k[1] for k in keys}, task_ids={k[2] for k in keys}
                )
            )
        return found

    async def confirm(self) -> int:
        dag_id, run_id, task_id, map_index = next(self.picks)
        found = await self.client.get_task_instance(
            dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index
        )
        return int(found is not None)

    async def naive(self, count: int, concurrency: int | None = None) -> int:
        slots = asyncio.Semaphore(concurrency or self.concurrency)

        async def one() -> int:
            async with slots:
                try:
                    return await self.confirm()
                except AirflowError as exc:  # the loop keeps the job (Unknown); counted here
                    self.errors.append(str(exc).rsplit(": ", 1)[-1])
                    return 0

        return sum(await asyncio.gather(*(one() for _ in range(count))))

    def take_errors(self, case: Case, asked: int) -> None:
        """Charge the naive reads that failed since the last call to ``case``."""
        case.errors += self.errors
        case.asked += asked
        self.errors = []


def reads_for(url: str, conn: psycopg.Connection, poll: PollConfig, picks: int) -> Reads:
    keys = active_keys(conn)
    client = AirflowClient(
        url,
        api_version="v2",  # Airflow 3's
        username=USERNAME,
        password=PASSWORD,
        timeout=READ_TIMEOUT,
    )
    lag = timedelta(seconds=poll.interval_seconds + poll.overlap_seconds)
    rng = random.Random(11)
    return Reads(client, keys, lag, iter([rng.choice(keys) for _ in range(picks)]), poll.max_concurrent_reads)


def add_index(conn: psycopg.Connection) -> float:
    """Add the ``updated_at`` index Airflow does not ship; seconds it took to build."""
    started = time.monotonic()
    conn.execute(f"CREATE INDEX {INDEX} ON task_instance (updated_at)")
    conn.execute("ANALYZE task_instance")
    return time.monotonic() - started


async def logged_phase(
    url: str, db: str, log: ServerLog, layout: Layout, poll: PollConfig, sampling: Sampling
) -> tuple[dict[str, Case], list[tuple[str, str]], float]:
    """Every read with its statements captured, then EXPLAIN ANALYZE, then the index comparison.

    The cases, ``task_instance``'s indexes (as Airflow ships them), and the added index's build time."""
    cases = cases_for(poll)
    conn = connect(db)
    n = sampling
    reads = reads_for(url, conn, poll, 20 * n.repeats + 2 * n.naive_sample + 10)
    heartbeat = touch(conn, layout)
    say(f"{len(reads.keys)} active (deferred) task instances tracked")
    try:
        await reads.client.ping()
        heartbeat()
        for warm in (reads.incremental, reads.batch, reads.confirm):  # pool, imports, token
            await warm()
        c, r = cases, reads
        say("incremental read (Airflow as shipped)")
        await measure(c["incremental"], r.incremental, n.repeats, r.client, log, db, heartbeat)
        say("batch read")
        await measure(c["batch"], r.batch, n.heavy_repeats, r.client, log, db)
        say("batch read, one request per DAG")
        await measure(c["batch per DAG"], r.batch_per_dag, n.heavy_repeats, r.client, log, db)
        say("single-TI read")
        await measure(c["confirm"], r.confirm, 3 * n.repeats, r.client, log, db)
        say(f"naive sample: {n.naive_sample} single reads, {r.concurrency} in flight")
        await measure(c["naive sample"], lambda: r.naive(n.naive_sample), 1, r.client, log, db)
        r.take_errors(c["naive sample"], n.naive_sample)
        say(f"naive sample: {n.naive_sample} single reads, 4 in flight")
        few = c["naive sample, 4 in flight"]
        await measure(few, lambda: r.naive(n.naive_sample, 4), 1, r.client, log, db)
        r.take_errors(few, n.naive_sample)

        indexes = {name for name, _ in ti_indexes(conn)}
        say("EXPLAIN ANALYZE of the captured statements")
        heartbeat()
        for name in ("incremental", "batch", "batch per DAG", "confirm"):
            c[name].explain(conn, indexes)

        say(f"adding {INDEX} on task_instance (updated_at) for the comparison")
        build = add_index(conn)
        heartbeat()
        await r.incremental()  # warm
        await measure(c["incremental + index"], r.incremental, n.repeats, r.client, log, db, heartbeat)
        heartbeat()
        c["incremental + index"].explain(conn, indexes | {INDEX})
        conn.execute(f"DROP INDEX {INDEX}")
        return cases, ti_indexes(conn), build
    finally:
        await reads.client.close()
        conn.close()


async def quiet_phase(
    url: str, db: str, cases: dict[str, Case], layout: Layout, poll: PollConfig, sampling: Sampling
) -> None:
    """Every read again on an api-server whose connections log nothing: latency only."""
    conn = connect(db)
    n = sampling
    reads = reads_for(url, conn, poll, 20 * n.repeats + 2 * n.naive_sample + 10)
    heartbeat = touch(conn, layout)
    c, r, heavy = cases, reads, max(1, n.heavy_repeats - 1)
    try:
        heartbeat()
        for warm in (r.incremental, r.batch, r.confirm):
            await warm()
        say("latency without statement logging")
        await measure(c["incremental"], r.incremental, n.repeats, r.client, None, db, heartbeat)
        await measure(c["batch"], r.batch, heavy, r.client, None, db)
        await measure(c["batch per DAG"], r.batch_per_dag, heavy, r.client, None, db)
        await measure(c["confirm"], r.confirm, 3 * n.repeats, r.client, None, db)
        await measure(c["naive sample"], lambda: r.naive(n.naive_sample), 1, r.client, None, db)
        r.take_errors(c["naive sample"], n.naive_sample)
        add_index(conn)
        heartbeat()
        await r.incremental()
        await measure(c["incremental + index"], r.incremental, n.repeats, r.client, None, db, heartbeat)
        conn.execute(f"DROP INDEX {INDEX}")
    finally:
        await reads.client.close()
        conn.close()


# --- Airflow's load per second of reconciler operation -----------------------------------------------


@dataclass
class Load:
    strategy: str
    cycle: float  # typical seconds between two reads of a job's state: bounds detection latency
    api: float  # seconds of api-server time per second
    sql: float  # ms of SQL per second
    rows: float  # task_instance rows examined per second


def loads(cases: dict[str, Case], poll: PollConfig, active: int) -> list[Load]:
    """Airflow's load per second of reconciler operation, from the logged medians.

    Incremental: in every ``full_resync_seconds`` one batch read, the rest incremental cycles of
    ``max(interval, latency)``. Batch: one batch read per ``max(interval, latency)``. Naive: the
    sample's per-TI cost times the active jobs, per ``max(interval, that)``.
    """
    interval, window = poll.interval_seconds, poll.full_resync_seconds
    bat = cases["batch"]
    out = []
    for label, inc in (
        ("incremental (Airflow as shipped) + batch resync", cases["incremental"]),
        ("incremental, `updated_at` indexed + batch resync", cases["incremental + index"]),
    ):
        cycle = max(interval, inc.latency)
        if bat.latency >= window:  # every cycle is a full resync: it is batch
            out.append(Load(label, max(interval, bat.latency), *_per_second(bat, max(interval, bat.latency))))
            continue
        n = (window - bat.latency) / cycle
        out.append(
            Load(
                label,
                cycle,
                (bat.latency + n * inc.latency) / window,
                (bat.sql_ms + n * inc.sql_ms) / window,
                (bat.rows_examined + n * inc.rows_examined) / window,
            )
        )
    for label, case in (("batch", bat), ("batch, one request per DAG", cases["batch per DAG"])):
        cycle = max(interval, case.latency)
        out.append(Load(label, cycle, *_per_second(case, cycle)))
    sample, one = cases["naive sample"], cases["confirm"]
    per_ti = sample.latency / sample.returned[0]
    cycle = max(interval, per_ti * active)
    out.append(
        Load(
            "naive (sample extrapolated)",
            cycle,
            per_ti * active / cycle,
            sample.sql_ms / sample.returned[0] * active / cycle,
            one.rows_examined * active / cycle,
        )
    )
    return out


def _per_second(case: Case, cycle: float) -> tuple[float, float, float]:
    return case.latency / cycle, case.sql_ms / cycle, case.rows_examined / cycle
