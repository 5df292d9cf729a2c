"""Candidate reads for a history-independent poll, side by side with today's, at two history sizes.

    python -m bench.candidate_reads                 # 1.02 M and 5 M task instances, ~11 min on 2 cores
    python -m bench.candidate_reads --runs 51       # one size only
    python -m bench.candidate_reads --quick         # ~40 s: 600 task instances; records nothing
    python -m bench.candidate_reads --keep          # keep the databases (and --reuse them next time)

For each size (runs per DAG: 51 -> 1,020,000 task instances, 250 -> 5,000,000) a PostgreSQL database
of our own is migrated by Airflow 3.3.2, filled in SQL (bench/airflow_db_fill.py, with scheduled,
queued and not-yet-run TIs in every latest run), and read through a real ``airflow api-server`` with
every statement logged. The reads (bench.candidate_bodies, bench.candidate_cost) are measured for
10,000 tracked jobs and for 100; the section "Candidate reads for a history-independent poll" of
bench/RESULTS.md gets the figures (bench.candidate_report). Each database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.airflow_db_fill import Layout
from bench.candidate_bodies import Scope, scope_of
from bench.candidate_cost import Scoped, measure_scope
from bench.candidate_report import HEADING, Run, Size, render, started_now
from bench.db_cost_report import write_results
from bench.metadata_db import (
    active_keys,
    api_server,
    connect,
    contents,
    log_statements,
    prepare,
    server_log_path,
)
from bench.pg_capture import ServerLog
from bench.read_cost import say
from bench.tracebacks import exceptions_logged
from harness.airflow import (
    AIRFLOW_VERSION,
    database_exists,
    drop_database,
    ensure_venv,
)
from reconciler.config import PollConfig, parse_config

# The live rows every latest run gets beside its deferred and running TIs: 1 scheduled or queued task
# and 10 not run yet per DAG (200 and 2,000 at 200 DAGs).
WAITING, PENDING = 1, 10
SAVED = Path(tempfile.gettempdir()) / "agentic-bench-candidates.pickle"
QUICK = Layout(dags=10, tasks=20, runs=3, deferred_per_dag=5, waiting_per_dag=1, pending_per_dag=3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.candidate_reads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", default="51,250", help="runs per DAG, one database per value (51,250)")
    parser.add_argument(
        "--small-dags", type=int, default=2, help="DAGs whose deferred TIs are the small scope (2: 100 jobs)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="reads of R1, R2, R3 one DAG (incremental: <= 5)"
    )
    parser.add_argument("--heavy-repeats", type=int, default=2, help="reads of R3 all DAGs and batch")
    parser.add_argument("--db-prefix", default="agentic_bench_candidates", help="databases: <prefix>_<runs>")
    parser.add_argument("--keep", action="store_true", help="keep the databases at the end")
    parser.add_argument("--reuse", action="store_true", help="use the databases as kept by --keep")
    parser.add_argument(
        "--quick", action="store_true", help="tiny layout, to check the bench; records nothing"
    )
    parser.add_argument("--pg-log", help="PostgreSQL's log file (default: found from the server)")
    parser.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument(
        "--save", default=str(SAVED), help=f"where the measurements are pickled before rendering ({SAVED})"
    )
    parser.add_argument("--render", metavar="PICKLE", help="only render (and record) a --save'd run")
    args = parser.parse_args(argv)
    if not args.db_prefix.startswith("agentic_bench_"):
        parser.error("--db-prefix must start with agentic_bench_ (the databases are dropped)")
    return args


def layout_for(runs: int, quick: bool) -> Layout:
    if quick:
        return QUICK
    return Layout(runs=runs, waiting_per_dag=WAITING, pending_per_dag=PENDING)


def postgres_settings() -> str:
    with connect() as conn:
        version = conn.execute("SHOW server_version").fetchone()
        shown = [
            (name, conn.execute(f"SHOW {name}").fetchone())
            for name in ("shared_buffers", "work_mem", "max_parallel_workers_per_gather", "random_page_cost")
        ]
    settings = ", ".join(f"{name} {row[0] if row else '?'}" for name, row in shown)
    return f"PostgreSQL {version[0] if version else '?'} ({settings})"


def measure_size(
    db: str, layout: Layout, args: argparse.Namespace, log: ServerLog, venv: Path, poll: PollConfig
) -> Size:
    tmp = Path(tempfile.mkdtemp(prefix="agentic-bench-candidates-"))
    home = tmp / "home"
    timings: dict[str, float] = {}
    try:
        if not (args.reuse and database_exists(db)):
            timings = prepare(db, layout, home, venv, say)
        with connect(db) as conn:
            data = contents(conn)
            keys = active_keys(conn)
        say(f"{db}: {data.task_instances:,} task instances ({data.size}): {data.states}")
        scopes: list[Scope] = [
            scope_of(keys, None, f"{len(keys):,} jobs"),
            scope_of(keys, args.small_dags, "small"),
        ]
        log_statements(db, on=True)
        scoped: list[Scoped] = []
        with api_server(db, home, venv) as server:
            for scope in scopes:
                say(f"{db}: {len(scope.keys):,} tracked jobs in {len(scope.dags)} DAGs")
                scoped.append(
                    asyncio.run(
                        measure_scope(
                            server.url, db, log, layout, poll, scope, args.repeats, args.heavy_repeats
                        )
                    )
                )
        errors = exceptions_logged(home / "logs-harness")
        if errors:
            say(f"api-server exceptions: {errors}")
        return Size(layout, data, timings, scoped)
    finally:
        log_statements(db, on=False)
        if not args.keep:
            drop_database(db)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return record(pickle.loads(Path(args.render).read_bytes()), args)
    poll = parse_config({}, os.environ).poll  # the sidecar's settings, as it would read them
    started, began = started_now(), time.monotonic()
    loadavg = {"at start": os.getloadavg()[0]}
    log = ServerLog(Path(args.pg_log) if args.pg_log else server_log_path())
    venv = ensure_venv(AIRFLOW_VERSION)
    sizes: list[Size] = []
    for runs in [int(r) for r in args.runs.split(",")][: 1 if args.quick else None]:
        layout = layout_for(runs, args.quick)
        say(f"== {layout.task_instances:,} task instances ({layout.runs} runs per DAG)")
        size = measure_size(f"{args.db_prefix}_{layout.runs}", layout, args, log, venv, poll)
        sizes.append(size)
        for sc in size.scoped:
            loadavg[
                f"{size.contents.task_instances / 1e6:.2f} M, {len(sc.scope.keys):,} jobs: reads began"
            ] = sc.loadavg[0]
        loadavg[f"after {size.contents.task_instances / 1e6:.2f} M"] = os.getloadavg()[0]
    run = Run(
        command=" ".join(["python -m bench.candidate_reads", *(argv if argv is not None else sys.argv[1:])]),
        started=started,
        runtime=time.monotonic() - began,
        sizes=sizes,
        loadavg=loadavg,
        postgres=postgres_settings(),
        poll=poll,
    )
    Path(args.save).write_bytes(pickle.dumps(run))  # a report that fails to render costs no re-run
    say(f"measurements saved in {args.save}; done in {run.runtime:.0f} s")
    return record(run, args)


def record(run: Run, args: argparse.Namespace) -> int:
    section = render(run)
    print(section)
    if not (args.no_record or args.quick):
        write_results(section, heading=HEADING)
        say("recorded in bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
