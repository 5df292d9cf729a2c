"""The benchmark's Airflow: a metadata database of its own on PostgreSQL, and api-servers reading it.

The database is created, migrated and dropped through the harness (``harness.airflow``); only the
api-server runs, so no scheduler or triggerer changes the filled data while it is measured.
Statement logging is switched on for this database alone (``log_min_duration_statement = 0``),
and the benchmark's own connections switch it off for themselves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.airflow_db_fill import Layout, fill
from harness.airflow import AirflowServer, create_database, drop_database, postgres_url

# Debian's cluster log when ``logging_collector`` is off (the server's stderr, written by pg_ctlcluster):
# PostgreSQL cannot report it, so it is assumed; ``--pg-log`` names another.
DEBIAN_LOG = "/var/log/postgresql/postgresql-{major}-main.log"


def connect(db: str | None = None) -> psycopg.Connection:
    """An autocommit connection to ``db`` (default: the admin database) whose statements are not logged."""
    conn = psycopg.connect(postgres_url(db), autocommit=True)
    conn.execute("SET log_min_duration_statement = -1")  # keep our own statements out of the capture
    return conn


def log_statements(db: str, on: bool) -> None:
    """Log every statement of ``db`` from its next connections on (``on``), or stop doing so."""
    with connect() as conn:
        setting = "SET log_min_duration_statement = 0" if on else "RESET log_min_duration_statement"
        conn.execute(f'ALTER DATABASE "{db}" {setting}')


def server_log_path() -> Path:
    """The PostgreSQL server's log file, as the server reports it (relative to its data directory)."""
    with connect() as conn:
        current = conn.execute("SELECT pg_current_logfile()").fetchone()
        data = conn.execute("SHOW data_directory").fetchone()
        version = conn.execute("SHOW server_version_num").fetchone()
    if current and current[0] and data:
        return Path(str(data[0])) / str(current[0])  # an absolute logfile path stays as it is
    return Path(DEBIAN_LOG.format(major=int(version[0]) // 10000 if version else 15))


@dataclass(frozen=True)
class Contents:
    task_instances: int
    size: str  # of task_instance with its indexes, pg_size_pretty
    states: list[tuple[str, int]]  # task instances per state, most first


def contents(conn: psycopg.Connection) -> Contents:
    total = conn.execute("SELECT count(*) FROM task_instance").fetchone()
    size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('task_instance'))").fetchone()
    states = conn.execute(
        "SELECT coalesce(state, 'none'), count(*) FROM task_instance GROUP BY 1 ORDER BY 2 DESC"
    ).fetchall()
    assert total is not None and size is not None
    return Contents(total[0], size[0], [(s, n) for s, n in states])


def ti_indexes(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(name, definition) of every index on ``task_instance``."""
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'task_instance' ORDER BY indexname"
        ).fetchall()
    ]


def active_keys(conn: psycopg.Connection) -> list[tuple[str, str, str, int]]:
    """The task instances the reconciler tracks: every deferred one."""
    rows = conn.execute(
        "SELECT dag_id, run_id, task_id, map_index FROM task_instance WHERE state = 'deferred'"
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def touch(conn: psycopg.Connection, layout: Layout) -> Callable[[], None]:
    """What Airflow does between two cycles: the running TIs heartbeat (Airflow's heartbeat UPDATE
    bumps ``updated_at`` too) and 1% of the deferred TIs change: ~300 rows updated in the last 5 s
    at full scale.

    The same deferred TIs each time, so every incremental read sees the same rows."""
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


def airflow_on(db: str, home: Path, venv: Path) -> AirflowServer:
    """The harness's Airflow 3, its metadata in ``db``; nothing is started yet."""
    (home / "dags").mkdir(parents=True, exist_ok=True)
    return AirflowServer(
        home=home,
        dags_folder=home / "dags",
        venv=venv,
        extra_env={
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_url(db, drivername="postgresql+psycopg2"),
            "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
        },
    )


@contextmanager
def api_server(db: str, home: Path, venv: Path) -> Iterator[AirflowServer]:
    """Airflow's api-server alone (1 worker) on ``db``, its log under ``home``/logs-harness."""
    server = airflow_on(db, home, venv)
    try:
        server.start_api_server(timeout=120)
        yield server
    finally:
        server.stop()


def prepare(db: str, layout: Layout, home: Path, venv: Path, say: Callable[[str], None]) -> dict[str, float]:
    """(Re)create ``db``, ``airflow db migrate`` it and fill it with ``layout``; seconds per step."""
    drop_database(db)
    create_database(db)
    say(f"airflow db migrate into {db}")
    started = time.monotonic()
    airflow_on(db, home, venv).migrate()
    timings = {"migrate": time.monotonic() - started}
    say(f"filling {layout.task_instances:,} task instances")
    started = time.monotonic()
    with connect(db) as conn:
        fill(conn, layout, say)
        conn.execute("VACUUM (ANALYZE)")
    timings["fill + VACUUM ANALYZE"] = time.monotonic() - started
    return timings
