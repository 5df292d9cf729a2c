"""Airflow-side cost of the reconciler's reads, against a metadata database of 1,020,000 task instances.

    python -m bench.airflow_db_cost            # ~4 min on 2 cores; writes bench/RESULTS.md's section
    python -m bench.airflow_db_cost --keep     # keep the database (and --reuse it next time)

Steps: create a PostgreSQL database of our own, ``airflow db migrate`` it with the cached Airflow
3.3.2 venv, fill it in SQL (bench/airflow_db_fill.py: 200 DAGs x 100 tasks x 51 daily runs, 99%
terminal, 10,000 deferred TIs tracked by the reconciler, 200 running TIs whose heartbeats bump
``updated_at``), start the real ``airflow api-server`` on it with every statement logged
(``log_min_duration_statement = 0`` on this database only), send the reconciler's own requests
through ``reconciler.airflow.AirflowClient``, read back the SQL each request ran from PostgreSQL's
log, and run ``EXPLAIN (ANALYZE, BUFFERS)`` on every statement that reads ``task_instance``.
The incremental read is measured as Airflow ships (no index on ``task_instance.updated_at``) and
again with such an index added by hand, to show what the index would change.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.airflow_db_fill import Layout, fill
from bench.pg_capture import PlanSummary, ServerLog, Statement, summarise
from harness.processes import free_port, start, stop_tree, wait_http_ok
from reconciler.airflow import AirflowClient, AirflowError

AIRFLOW_VERSION = "3.3.2"
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
CONFIG = REPO / "config" / "reconciler.toml"
HEADING = "## Airflow-side cost at 1,000,000 task instances"
PG = "postgresql://postgres@127.0.0.1:5432"
USER = PASSWORD = "admin"  # a throwaway Airflow on loopback
READ_CONCURRENCY = 16  # reconciler.loop.READ_CONCURRENCY: direct reads in flight at once
INDEX = "bench_ti_updated_at"  # the index Airflow does not ship, added for the comparison


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- Airflow venv, database, api-server -------------------------------------------------------------


def airflow_venv() -> Path:
    """The cached Airflow 3.3.2 venv, with the PostgreSQL drivers Airflow needs (idempotent).

    Airflow uses psycopg2 for its sync engine and derives an asyncpg URL for its async one, so both
    must be importable even though only the sync engine serves the reads measured here.
    """
    cache = Path(os.environ.get("AGENTIC_CACHE", Path.home() / ".cache" / "agentic-airflow"))
    venv = cache / f"airflow-{AIRFLOW_VERSION}"
    if not (venv / ".complete").exists():
        from harness.airflow import ensure_venv  # creates it (~20 s), under the harness's lock

        venv = ensure_venv(AIRFLOW_VERSION)
    python = str(venv / "bin" / "python")
    probe = [python, "-c", "import psycopg2, asyncpg"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        with open(cache / f".airflow-{AIRFLOW_VERSION}.lock", "w") as lock:  # the harness's lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
                say("installing psycopg2-binary and asyncpg into the Airflow venv")
                subprocess.run(
                    [python, "-m", "pip", "install", "-q", "psycopg2-binary>=2.9,<3", "asyncpg>=0.29"],
                    check=True,
                )
    return venv


def admin() -> psycopg.Connection:
    return psycopg.connect(f"{PG}/postgres", autocommit=True)


def connect(db: str) -> psycopg.Connection:
    conn = psycopg.connect(f"{PG}/{db}", autocommit=True)
    conn.execute("SET log_min_duration_statement = -1")  # keep our own statements out of the capture
    return conn


def database_exists(db: str) -> bool:
    with admin() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is not None


def drop_database(db: str) -> None:
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def airflow_env(venv: Path, home: Path, db: str, port: int) -> dict[str, str]:
    """The environment of /work/shared/AIRFLOW.md, on our PostgreSQL database."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dags").mkdir(exist_ok=True)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD}))
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
            "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__API_AUTH__JWT_SECRET": "agentic-bench-jwt-secret",
            "AIRFLOW__API__SECRET_KEY": "agentic-bench-secret-key",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}",
        }
    )
    return env


@contextmanager
def api_server(venv: Path, env: dict[str, str], port: int, log_path: Path) -> Iterator[str]:
    argv = [str(venv / "bin" / "airflow"), "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"]
    proc = start(argv, log_path=log_path, env=env)
    say(f"api-server pid {proc.pid} on 127.0.0.1:{port}")
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_tree(proc)


RAISE = re.compile(r"^\s+raise ([\w.]+)")
FRAME = re.compile(r'^\s+File "(?:.*/site-packages/)?([^"]+)", line \d+')


def exceptions_logged(logs: Path) -> Counter[str]:
    """What the api-servers' logged tracebacks raised, by the innermost ``raise`` and its file."""
    found: Counter[str] = Counter()
    for path in sorted(logs.glob("*.log")):
        frame = ""
        last: str | None = None
        for line in path.read_text(errors="replace").splitlines():
            if match := FRAME.match(line):
                frame = match[1]
            elif match := RAISE.match(line):
                last = f"{match[1]} in {frame}"
            elif not line.startswith((" ", "Traceback")) and last is not None:
                found[last] += 1  # the traceback ended: its last raise is the innermost one
                last = None
        if last is not None:
            found[last] += 1
    return found


def pg_log_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    with admin() as conn:
        row = conn.execute("SELECT pg_current_logfile()").fetchone()
        major = conn.execute("SHOW server_version_num").fetchone()
    if row and row[0]:
        return Path(row[0]) if row[0].startswith("/") else Path("/var/lib/postgresql") / row[0]
    return Path(f"/var/log/postgresql/postgresql-{int(major[0]) // 10000 if major else 15}-main.log")

# --- measurement -------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    strategy: str  # where the reconciler sends this read
    latencies: list[float] = field(default_factory=list)  # statement logging on
    quiet: list[float] = field(default_factory=list)  # statement logging off (second api-server)
    requests: list[int] = field(default_factory=list)
    returned: list[int] = field(default_factory=list)
    runs: list[list[Statement]] = field(default_factory=list)  # statements per measured read
    plans: list[tuple[Statement, PlanSummary]] = field(default_factory=list)  # first read's TI statements
    others: list[tuple[Statement, PlanSummary]] = field(default_factory=list)  # one per other shape
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


TI_READ = re.compile(r"\bFROM task_instance\b")


def is_ti_read(s: Statement) -> bool:
    return s.kind in ("SELECT", "WITH") and bool(TI_READ.search(s.sql))


async def measure(
    case: Case,
    read: Callable[[], Awaitable[int]],
    repeats: int,
    client: AirflowClient,
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


def explain(conn: psycopg.Connection, sql: str, indexes: set[str]) -> PlanSummary:
    plan_json = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}".encode()).fetchone()
    plan_text = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}".encode()).fetchall()
    assert plan_json is not None
    return summarise(plan_json[0], "\n".join(r[0] for r in plan_text), "task_instance", indexes)


def explain_case(conn: psycopg.Connection, case: Case, indexes: set[str]) -> None:
    """EXPLAIN ANALYZE every task_instance read of the first measured read, and one of each other shape."""
    seen: set[str] = set()
    for stmt in case.runs[0]:
        if is_ti_read(stmt):
            case.plans.append((stmt, explain(conn, stmt.sql, indexes)))
        elif stmt.kind == "SELECT" and stmt.shape not in seen:
            seen.add(stmt.shape)
            case.others.append((stmt, explain(conn, stmt.sql, indexes)))


def ti_indexes(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'task_instance' ORDER BY indexname"
        ).fetchall()
    ]


def touch(conn: psycopg.Connection, layout: Layout) -> Callable[[], None]:
    """What Airflow does between two cycles: the 200 running TIs heartbeat (Airflow's heartbeat UPDATE
    bumps ``updated_at`` too) and 100 deferred TIs change: ~300 rows updated in the last 5 s.

    The same 100 deferred TIs each time, so every incremental read sees the same ~300 rows."""
    changing = random.Random(7).sample(range(1, layout.active + 1), max(1, layout.active // 100))

    def run() -> None:
        conn.execute(
            "UPDATE task_instance SET updated_at = now() - random() * interval '5 seconds', "
            "last_heartbeat_at = now() WHERE state = 'running'"
        )
        conn.execute(
            "UPDATE task_instance SET updated_at = now() - random() * interval '5 seconds' "
            "WHERE trigger_id = ANY(%s)",
            (changing,),
        )

    return run


@dataclass
class Reads:
    """The reconciler's reads, through its own client."""

    client: AirflowClient
    keys: list[tuple[str, str, str, int]]
    lag: timedelta  # interval + overlap: how far back an incremental read asks
    picks: Iterator[tuple[str, str, str, int]]
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
        by_dag: dict[str, list[tuple[str, str, str, int]]] = {}
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
        return int(await self.client.get_task_instance(*next(self.picks)) is not None)

    async def naive(self, count: int, concurrency: int = READ_CONCURRENCY) -> int:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with slots:
                try:
                    return await self.confirm()
                except AirflowError as exc:  # the loop keeps the job (Unknown); counted here
                    self.errors.append(str(exc).rsplit(": ", 1)[-1])
                    return 0

        return sum(await asyncio.gather(*(one() for _ in range(count))))


def reads_for(url: str, conn: psycopg.Connection, poll: dict[str, Any], picks: int) -> Reads:
    keys = [
        (r[0], r[1], r[2], r[3])
        for r in conn.execute(
            "SELECT dag_id, run_id, task_id, map_index FROM task_instance WHERE state = 'deferred'"
        ).fetchall()
    ]
    client = AirflowClient(url, api_version="v2", username=USER, password=PASSWORD, timeout=600)
    lag = timedelta(seconds=float(poll["interval_seconds"]) + float(poll["overlap_seconds"]))
    rng = random.Random(11)
    return Reads(client, keys, lag, iter([rng.choice(keys) for _ in range(picks)]))


CASES = {
    "incremental": "`incremental`, every cycle",
    "incremental + index": "`incremental`, if `updated_at` were indexed",
    "batch": "`batch` every cycle; `incremental`'s full resync",
    "batch per DAG": "the same keys, one batch request per DAG, sequentially (an alternative)",
    "confirm": "confirmation of each stop; `naive` (one per job)",
    "naive sample": f"`naive`: single reads, {READ_CONCURRENCY} in flight as the loop does",
    "naive sample, 4 in flight": "the same, 4 in flight",
}


async def logged_phase(
    url: str, db: str, log: ServerLog, layout: Layout, poll: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, Case], list[tuple[str, str]], float]:
    """Every read with its statements captured, then EXPLAIN ANALYZE, then the index comparison."""
    cases = {name: Case(name, strategy) for name, strategy in CASES.items()}
    conn = connect(db)
    reads = reads_for(url, conn, poll, 20 * args.repeats + 2 * args.naive_sample + 10)
    heartbeat = touch(conn, layout)
    say(f"{len(reads.keys)} active (deferred) task instances tracked")
    try:
        await reads.client.ping()
        heartbeat()
        for warm in (reads.incremental, reads.batch, reads.confirm):  # pool, imports, token
            await warm()
        c, r = cases, reads
        say("incremental read (Airflow as shipped)")
        await measure(c["incremental"], r.incremental, args.repeats, r.client, log, db, heartbeat)
        say("batch read")
        await measure(c["batch"], r.batch, args.heavy_repeats, r.client, log, db)
        say("batch read, one request per DAG")
        await measure(c["batch per DAG"], r.batch_per_dag, args.heavy_repeats, r.client, log, db)
        say("single-TI read")
        await measure(c["confirm"], r.confirm, 3 * args.repeats, r.client, log, db)
        say(f"naive sample: {args.naive_sample} single reads, {READ_CONCURRENCY} in flight")
        await measure(c["naive sample"], lambda: r.naive(args.naive_sample), 1, r.client, log, db)
        c["naive sample"].errors += r.errors
        c["naive sample"].asked += args.naive_sample
        r.errors = []
        say(f"naive sample: {args.naive_sample} single reads, 4 in flight")
        few = c["naive sample, 4 in flight"]
        await measure(few, lambda: r.naive(args.naive_sample, 4), 1, r.client, log, db)
        few.errors += r.errors
        few.asked += args.naive_sample

        indexes = {name for name, _ in ti_indexes(conn)}
        say("EXPLAIN ANALYZE of the captured statements")
        heartbeat()
        for name in ("incremental", "batch", "batch per DAG", "confirm"):
            explain_case(conn, c[name], indexes)

        say(f"adding {INDEX} on task_instance (updated_at) for the comparison")
        started = time.monotonic()
        conn.execute(f"CREATE INDEX {INDEX} ON task_instance (updated_at)")
        conn.execute("ANALYZE task_instance")
        build = time.monotonic() - started
        heartbeat()
        await r.incremental()  # warm
        await measure(c["incremental + index"], r.incremental, args.repeats, r.client, log, db, heartbeat)
        heartbeat()
        explain_case(conn, c["incremental + index"], indexes | {INDEX})
        conn.execute(f"DROP INDEX {INDEX}")
        return cases, ti_indexes(conn), build
    finally:
        await reads.client.close()
        conn.close()


async def quiet_phase(
    url: str, db: str, cases: dict[str, Case], layout: Layout, poll: dict[str, Any], args: argparse.Namespace
) -> None:
    """Every read again on an api-server whose connections log nothing: latency only."""
    conn = connect(db)
    reads = reads_for(url, conn, poll, 20 * args.repeats + 2 * args.naive_sample + 10)
    heartbeat = touch(conn, layout)
    c, r, heavy = cases, reads, max(1, args.heavy_repeats - 1)
    try:
        heartbeat()
        for warm in (r.incremental, r.batch, r.confirm):
            await warm()
        say("latency without statement logging")
        await measure(c["incremental"], r.incremental, args.repeats, r.client, None, db, heartbeat)
        await measure(c["batch"], r.batch, heavy, r.client, None, db)
        await measure(c["batch per DAG"], r.batch_per_dag, heavy, r.client, None, db)
        await measure(c["confirm"], r.confirm, 3 * args.repeats, r.client, None, db)
        await measure(c["naive sample"], lambda: r.naive(args.naive_sample), 1, r.client, None, db)
        c["naive sample"].errors += r.errors
        c["naive sample"].asked += args.naive_sample
        conn.execute(f"CREATE INDEX {INDEX} ON task_instance (updated_at)")
        conn.execute("ANALYZE task_instance")
        heartbeat()
        await r.incremental()
        await measure(c["incremental + index"], r.incremental, args.repeats, r.client, None, db, heartbeat)
        conn.execute(f"DROP INDEX {INDEX}")
    finally:
        await reads.client.close()
        conn.close()


# --- report ------------------------------------------------------------------------------------------


def fmt_ms(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_lat(values: list[float]) -> str:
    if not values:
        return "-"
    mid = fmt_ms(statistics.median(values) * 1000)
    if len(values) == 1:
        return f"{mid} (n=1)"
    return f"{mid} ({fmt_ms(min(values) * 1000)}-{fmt_ms(max(values) * 1000)}, n={len(values)})"


def access(case: Case) -> str:
    paths = Counter(a for _, p in case.plans for a in p.access)
    return "; ".join(f"{a} x{n}" if n > 1 else a for a, n in paths.items()) or "-"


def breakdown(run: list[Statement]) -> str:
    kinds = Counter(
        "on task_instance"
        if is_ti_read(s)
        else "other SELECT"
        if s.kind == "SELECT"
        else "BEGIN/COMMIT/ROLLBACK"
        if s.kind in ("BEGIN", "COMMIT", "ROLLBACK")
        else s.kind
        for s in run
    )
    order = ["on task_instance", "other SELECT", "INSERT", "BEGIN/COMMIT/ROLLBACK"]
    parts = [f"{kinds.pop(k)} {k}" for k in order if k in kinds]
    parts += [f"{n} {k}" for k, n in kinds.items()]
    return f"{len(run):,}: {', '.join(parts)}"


def cases_table(cases: dict[str, Case]) -> list[str]:
    rows = [
        "| read (used by) | HTTP requests | TIs returned | API latency, statement logging off | "
        "API latency, logging on | SQL statements per read | SQL time per read (server log) | "
        "task_instance statements: EXPLAIN ANALYZE | task_instance rows examined | task_instance access |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases.values():
        rows.append(
            f"| **{c.name}** ({c.strategy}) | {statistics.median(c.requests):.0f} | "
            f"{statistics.median(c.returned):,.0f} | {fmt_lat(c.quiet)} | {fmt_lat(c.latencies)} | "
            f"{breakdown(c.runs[0])} | {fmt_ms(c.sql_ms)} | "
            + (
                f"{fmt_ms(c.ti_explain_ms)} | {c.rows_examined:,} | {access(c)} |"
                if c.plans
                else "as confirm, per TI | as confirm | as confirm |"
            )
        )
    return rows


@dataclass
class Load:
    strategy: str
    cycle: float  # typical seconds between two reads of a job's state: bounds detection latency
    api: float  # seconds of api-server time per second
    sql: float  # ms of SQL per second
    rows: float  # task_instance rows examined per second


def loads(cases: dict[str, Case], poll: dict[str, Any], active: int) -> list[Load]:
    """Airflow's load per second of reconciler operation, from the logged medians.

    Incremental: in every ``full_resync_seconds`` one batch read, the rest incremental cycles of
    ``max(interval, latency)``. Batch: one batch read per ``max(interval, latency)``. Naive: the
    sample's per-TI cost times the active jobs, per ``max(interval, that)``.
    """
    interval = float(poll["interval_seconds"])
    window = float(poll["full_resync_seconds"])
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


def loads_table(rows: list[Load], poll: dict[str, Any], active: int) -> list[str]:
    return [
        f"| strategy ({active:,} active jobs, interval {float(poll['interval_seconds']):g} s, "
        f"resync every {float(poll['full_resync_seconds']):g} s) | cycle (bounds detection latency) | "
        "reconciler request in flight, s per s | SQL, ms per s | task_instance rows examined per s |",
        "|---|---|---|---|---|",
        *(
            f"| {r.strategy} | {fmt_ms(r.cycle * 1000)} | {r.api:.2f} | {r.sql:,.0f} | {r.rows:,.0f} |"
            for r in rows
        ),
    ]


FROM = re.compile(r"\bFROM\s+(.*)$", re.S)


def plan_lines(cases: dict[str, Case]) -> list[str]:
    out: list[str] = []
    for c in cases.values():
        if not c.plans:
            continue
        out.append(f"== {c.name}: {len(c.plans)} statement(s) on task_instance in one read")
        shown: set[str] = set()
        for i, (stmt, plan) in enumerate(c.plans):
            what = "count" if "count(*)" in stmt.sql else "rows"
            key = f"{what}:{plan.access}"
            if key in shown:
                continue
            shown.add(key)
            same = sum(
                1
                for s, p in c.plans
                if ("count(*)" in s.sql) == (what == "count") and p.access == plan.access
            )
            out.append(
                f"-- statement {i + 1} ({what}; {same} like it in this read): logged {fmt_ms(stmt.ms)}, "
                f"EXPLAIN ANALYZE {fmt_ms(plan.execution_ms)}, {plan.rows_examined:,} task_instance rows "
                f"examined, buffers hit {plan.shared_hit:,} read {plan.shared_read:,}"
            )
            out.extend("   " + line for line in plan.key_lines)
        counts = Counter(s.shape for s in c.runs[0] if s.kind == "SELECT" and not is_ti_read(s))
        for stmt, plan in c.others:
            match = FROM.search(stmt.shape)
            where = ("FROM " + " ".join(match[1].split())) if match else " ".join(stmt.shape.split())
            if where == "SELECT ?":
                where = "SELECT 1 (SQLAlchemy pool pre-ping)"
            first = plan.key_lines[0].split(" (cost")[0] if plan.key_lines else ""
            out.append(
                f"-- other SELECT x{counts[stmt.shape]}: {where[:90]} | {fmt_ms(stmt.ms)} logged | {first}"
            )
    return out


def sample_sql(cases: dict[str, Case]) -> list[str]:
    out: list[str] = []
    for c in cases.values():
        for stmt, _ in c.plans[:2]:
            text = " ".join(stmt.sql.split())
            match = FROM.search(text)
            tail = ("... FROM " + match[1]) if match else text
            out.append(f"{c.name}: {tail[:700]}{' ...' if len(tail) > 700 else ''}")
    return out


def recommendation(cases: dict[str, Case], rows: list[Load], poll: dict[str, Any], active: int) -> str:
    inc, idx, bat, _, naive = rows
    inc_case, bat_case, per_dag = cases["incremental"], cases["batch"], cases["batch per DAG"]
    indexed = cases["incremental + index"]
    scans = sum(1 for _, p in inc_case.plans if not p.uses_index)
    window = float(poll["full_resync_seconds"])
    if inc.cycle <= 1.25 * bat.cycle and (inc.cycle < 0.8 * bat.cycle or inc.sql <= bat.sql):
        head = (
            f"**Recommendation: `incremental` stays the default strategy.** Reason: with {active:,} active "
            f"jobs it reads every job's state each {fmt_ms(inc.cycle * 1000)}, while one `batch` read takes "
            f"{fmt_ms(bat_case.latency * 1000)} ({fmt_ms(bat_case.sql_ms)} of it SQL: "
            f"{bat_case.rows_examined:,} task_instance rows examined; then one trigger query per "
            f"deferred TI and the serialisation of all {active:,} TIs), so `batch` cannot poll more "
            f"often than every {fmt_ms(bat.cycle * 1000)} and would see a divergence "
            f"~{bat.cycle / inc.cycle:.0f}x later, for "
            f"{'less' if bat.sql < inc.sql else 'no less'} SQL per second ({bat.sql:,.0f} against "
            f"{inc.sql:,.0f} ms). `naive` is out of the question ({fmt_ms(naive.cycle * 1000)} per cycle)."
        )
    else:
        head = (
            f"**Recommendation: make `batch` the default strategy.** Reason: `incremental` needs "
            f"{fmt_ms(inc_case.latency * 1000)} and {fmt_ms(inc_case.sql_ms)} of SQL per read against "
            f"{fmt_ms(bat_case.latency * 1000)} and {fmt_ms(bat_case.sql_ms)} for `batch`, whose cycle is "
            f"{fmt_ms(bat.cycle * 1000)} against {fmt_ms(inc.cycle * 1000)}."
        )
    return "\n".join(
        [
            head,
            "",
            f"- What `incremental` costs Airflow 3.3.2 is real: `task_instance.updated_at` has no index, so "
            f"each read runs {scans} full scans of the table (the first page's rows, and the count Airflow "
            f"adds to every cursor page): {inc_case.rows_examined:,} rows examined per read, "
            f"{inc.rows:,.0f} per second, {inc.sql:,.0f} ms of SQL per second, growing with the table, not "
            f"with the number of jobs. With an index on `updated_at` (which Airflow does not ship) the read "
            f"examines {indexed.rows_examined:,} rows and takes {fmt_ms(indexed.latency * 1000)}; SQL falls "
            f"to {idx.sql:,.0f} ms per second. "
            f"Operators of large metadata databases should add `CREATE INDEX ... ON task_instance "
            f"(updated_at)`, keep `task_instance` small (`airflow db clean`), or raise `interval_seconds`.",
            f"- The full resync costs too: one batch read every {window:g} s keeps a reconciler request in "
            f"flight {bat_case.latency / window:.0%} of the time, and no incremental read runs meanwhile. "
            f"Asking per DAG lets the batch query use `ti_dag_run` ({per_dag.rows_examined:,} rows examined "
            f"instead of {bat_case.rows_examined:,}); end to end it takes {fmt_ms(per_dag.latency * 1000)} "
            f"against {fmt_ms(bat_case.latency * 1000)}"
            + (
                ", a real saving."
                if per_dag.latency < 0.8 * bat_case.latency
                else ": no real saving, the time goes to Airflow's per-TI work."
            )
            + " With many thousands of active jobs, `full_resync_seconds` should grow.",
        ]
    )


def errors_line(cases: dict[str, Case], server_errors: Counter[str]) -> str:
    naive = [c for c in cases.values() if c.name.startswith("naive")]
    if not any(c.errors for c in naive) and not server_errors:
        return "**Errors.** None: every request was answered, and the api-servers logged no traceback."
    parts = []
    for c in naive:
        kinds = ", ".join(f"{text} x{n}" for text, n in Counter(c.errors).most_common())
        failed = f"{c.name}: {len(c.errors)} of {c.asked} reads failed"
        parts.append(failed + (f" ({kinds})" if kinds else ""))
    logged = "; ".join(f"`{text}` x{n}" for text, n in server_errors.most_common(4)) or "nothing"
    pool = any("pool/impl.py" in text for text in server_errors)
    return (
        "**Errors.** "
        + "; ".join(parts)
        + ". The reconciler treats a failed read as \"unknown\" and keeps the job. The api-servers' "
        f"tracebacks ended in: {logged}"
        + (
            ": SQLAlchemy's connection pool ran dry (Airflow's defaults: `sql_alchemy_pool_size` 5 + "
            "`sql_alchemy_max_overflow` 10 per api-server worker; a request then waits 30 s for a "
            "connection and fails): reads beyond what the pool serves wait and fail instead of adding "
            "throughput (compare the 4-in-flight sample)."
            if pool
            else "."
        )
    )


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = text.split("\n")
    try:
        start_at = lines.index(HEADING)
    except ValueError:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
        return
    end = next((i for i in range(start_at + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = ["", *lines[end:]] if end < len(lines) else []
    new = [*lines[:start_at], *section.rstrip("\n").split("\n"), *tail]
    RESULTS.write_text("\n".join(new).rstrip("\n") + "\n")


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", default="agentic_bench_airflow", help="database to create (and drop)")
    parser.add_argument("--keep", action="store_true", help="keep the database at the end")
    parser.add_argument("--reuse", action="store_true", help="use the database as kept by --keep")
    parser.add_argument("--repeats", type=int, default=7, help="measured incremental reads (confirm: 3x)")
    parser.add_argument("--heavy-repeats", type=int, default=3, help="measured batch reads")
    parser.add_argument("--naive-sample", type=int, default=500, help="single reads for the naive figure")
    parser.add_argument("--runs", type=int, default=Layout.runs, help="runs per DAG (51: 1,020,000 TIs)")
    parser.add_argument("--pg-log", help="PostgreSQL's log file (default: found from the server)")
    parser.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args(argv)
    if not args.db.startswith("agentic_bench_"):
        parser.error("--db must start with agentic_bench_ (it is dropped at the end)")

    began = time.monotonic()
    loadavg = {"start": os.getloadavg()[0]}
    layout = Layout(runs=args.runs)
    poll = tomllib.loads(CONFIG.read_text())["poll"]
    log = ServerLog(pg_log_path(args.pg_log))
    venv = airflow_venv()
    tmp = Path(tempfile.mkdtemp(prefix="agentic-bench-airflow-"))
    timings: dict[str, float] = {}
    try:
        if not (args.reuse and database_exists(args.db)):
            drop_database(args.db)
            with admin() as conn:
                conn.execute(f'CREATE DATABASE "{args.db}"')
            say(f"airflow db migrate into {args.db}")
            started = time.monotonic()
            env = airflow_env(venv, tmp / "home", args.db, free_port())
            result = subprocess.run(
                [str(venv / "bin" / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(f"airflow db migrate failed:\n{result.stderr[-3000:]}")
            timings["migrate"] = time.monotonic() - started
            say(f"filling {layout.task_instances:,} task instances")
            started = time.monotonic()
            with connect(args.db) as conn:
                fill(conn, layout, say)
                conn.execute("VACUUM (ANALYZE)")
            timings["fill + VACUUM ANALYZE"] = time.monotonic() - started
        with connect(args.db) as conn:
            total = conn.execute("SELECT count(*) FROM task_instance").fetchone()
            states = conn.execute(
                "SELECT coalesce(state, 'none'), count(*) FROM task_instance GROUP BY 1 ORDER BY 2 DESC"
            ).fetchall()
            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('task_instance'))").fetchone()
            conn.execute(f'ALTER DATABASE "{args.db}" SET log_min_duration_statement = 0')
        assert total is not None and size is not None
        say(f"{total[0]:,} task instances ({size[0]} with indexes): {states}")

        loadavg["reads"] = os.getloadavg()[0]
        started = time.monotonic()
        port = free_port()
        env = airflow_env(venv, tmp / "home", args.db, port)
        with api_server(venv, env, port, tmp / "logs" / "api-server-1.log") as url:
            cases, indexes, build = asyncio.run(logged_phase(url, args.db, log, layout, poll, args))
        loadavg["logged run end"] = os.getloadavg()[0]
        with admin() as conn:
            conn.execute(f'ALTER DATABASE "{args.db}" RESET log_min_duration_statement')
        port = free_port()
        env = airflow_env(venv, tmp / "home", args.db, port)
        with api_server(venv, env, port, tmp / "logs" / "api-server-2.log") as url:
            asyncio.run(quiet_phase(url, args.db, cases, layout, poll, args))
        timings["reads and EXPLAINs"] = time.monotonic() - started
        loadavg["end"] = os.getloadavg()[0]
        server_errors = exceptions_logged(tmp / "logs")
    except BaseException:
        say(f"api-server exceptions: {exceptions_logged(tmp / 'logs')}")
        raise
    finally:
        if args.keep:
            with admin() as conn:
                conn.execute(f'ALTER DATABASE "{args.db}" RESET log_min_duration_statement')
        else:
            drop_database(args.db)
        shutil.rmtree(tmp, ignore_errors=True)
    runtime = time.monotonic() - began

    rows = loads(cases, poll, layout.active)
    updated_at_indexed = [n for n, d in indexes if "updated_at" in d]
    command = " ".join(["python -m bench.airflow_db_cost", *(argv if argv is not None else sys.argv[1:])])
    machine = (
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}; PostgreSQL 15 with default settings "
        "(shared_buffers 128 MB, max_parallel_workers_per_gather 2)"
    )
    lag = float(poll["interval_seconds"]) + float(poll["overlap_seconds"])
    out = [
        HEADING,
        "",
        f"Command: `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {runtime:.0f} s in all "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}). Machine: {machine}. "
        f"Load average (1 min): {loadavg['start']:.2f} at start, {loadavg['reads']:.2f} when the reads "
        f"began, {loadavg['logged run end']:.2f} after the logged run, {loadavg['end']:.2f} at the end: "
        "other test runs shared the 2 cores, so latencies are those of a busy machine.",
        "",
        f"**Data.** Airflow {AIRFLOW_VERSION}'s metadata schema (`airflow db migrate` on PostgreSQL), "
        f"{total[0]:,} task instances ({size[0]} with indexes): {layout.dags} DAGs x {layout.tasks} tasks "
        f"x {layout.runs} daily runs; "
        + ", ".join(f"{s} {n:,}" for s, n in states)
        + f". The reconciler tracks the {layout.active:,} deferred TIs (latest run of every DAG, one trigger "
        "row each, last updated 30 min to 1 day ago). Before each incremental read the 200 running TIs "
        "heartbeat and 100 deferred TIs change, so ~300 rows have `updated_at` in the last 5 s. "
        f"Incremental reads ask for `updated_at_gte = now - {lag:g} s` (interval + overlap of "
        "config/reconciler.toml). Built by bench/airflow_db_fill.py.",
        "",
        "**Method.** The reconciler's own client (`reconciler.airflow.AirflowClient`) against the real "
        "`airflow api-server` (1 worker, SimpleAuthManager). The SQL of each read is what PostgreSQL "
        "logged for it (`ALTER DATABASE ... SET log_min_duration_statement = 0`); every statement on "
        "`task_instance` was then re-run under `EXPLAIN (ANALYZE, BUFFERS)`. \"Rows examined\" counts the "
        "rows the `task_instance` scans read (returned + removed by filters) over all of a read's "
        "statements. Latencies are medians (min-max, n); the logging-off column comes from a second "
        "api-server started after the setting was reset, to show what statement logging adds (the load "
        "changed between the two runs, see above). All other figures come from the logged run (under "
        "concurrency, as in the naive sample, logged durations include waiting for a CPU). PostgreSQL "
        "runs the full scans in parallel (2 workers), so their CPU cost is up to 3x their duration.",
        "",
        *cases_table(cases),
        "",
        "Airflow's load per second of reconciler operation, from the logged medians. \"Cycle\" is the "
        "time between two reads of a job's state, so it bounds how fast a divergence is seen; "
        "\"in flight\" is the share of time a reconciler request is being served (1.00: the loop reads "
        "back to back, and a strategy that would need more stretches its cycle instead):",
        "",
        *loads_table(rows, poll, layout.active),
        "",
        errors_line(cases, server_errors),
        "",
        "**Indexes.** `task_instance` in Airflow 3.3.2 has: "
        + ", ".join(f"`{n}`" for n, _ in indexes)
        + ". "
        + (
            "**None covers `updated_at`**, so `updated_at >= T` is evaluated by reading the whole table."
            if not updated_at_indexed
            else f"`updated_at` is covered by {', '.join(updated_at_indexed)}."
        )
        + f" The \"incremental + index\" row adds `CREATE INDEX {INDEX} ON task_instance (updated_at)` "
        f"by hand (built in {build:.1f} s), then drops it.",
        "",
        "Plans, key lines:",
        "",
        "```",
        *plan_lines(cases),
        "```",
        "",
        "The captured `task_instance` statements (SELECT lists elided):",
        "",
        "```",
        *sample_sql(cases),
        "```",
        "",
        recommendation(cases, rows, poll, layout.active),
        "",
    ]
    section = "\n".join(out)
    print(section)
    if not args.no_record:
        write_results(section)
        say(f"recorded in {RESULTS.relative_to(REPO)}")
    say(f"done in {runtime:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
