"""Airflow-side cost of the reconciler's reads, against a metadata database of 1,020,000 task instances.

    python -m bench.airflow_db_cost            # ~4 min on 2 cores; writes bench/RESULTS.md's section
    python -m bench.airflow_db_cost --keep     # keep the database (and --reuse it next time)
    python -m bench.airflow_db_cost --quick    # ~1 min: 600 task instances, few reads; records nothing

Steps: create a PostgreSQL database of our own, ``airflow db migrate`` it with the harness's cached
Airflow 3.3.2 venv, fill it in SQL (bench/airflow_db_fill.py: 200 DAGs x 100 tasks x 51 daily runs,
99% terminal, 10,000 deferred TIs tracked by the reconciler, 200 running TIs whose heartbeats bump
``updated_at``), start the real ``airflow api-server`` on it with every statement logged
(``log_min_duration_statement = 0`` on this database only), send the reconciler's own requests
through ``reconciler.airflow.client.AirflowClient``, read back the SQL each request ran from PostgreSQL's
log, and run ``EXPLAIN (ANALYZE, BUFFERS)`` on every statement that reads ``task_instance``.
The incremental read is measured as Airflow ships (no index on ``task_instance.updated_at``) and
again with such an index added by hand, to show what the index would change.

The sidecar's poll settings (interval, overlap, full resync, reads in flight) are the defaults of
``reconciler.config``, overridable as the sidecar's are: AGENTIC_RECONCILER_POLL_<KEY>.
PostgreSQL is the harness's (AGENTIC_TEST_POSTGRES, default postgresql://postgres@127.0.0.1:5432).

Modules: bench.metadata_db (the database and api-servers), bench.read_cost (the reads and their
load), bench.explain (EXPLAIN of captured SQL), bench.tracebacks (api-server errors),
bench.db_cost_report (the markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.airflow_db_fill import Layout
from bench.db_cost_report import RESULTS, Run, render, write_results
from bench.metadata_db import api_server, connect, contents, log_statements, prepare, server_log_path
from bench.pg_capture import ServerLog
from bench.read_cost import Sampling, logged_phase, quiet_phase, say
from bench.tracebacks import exceptions_logged
from harness.airflow import (
    AIRFLOW_VERSION,
    database_exists,
    drop_database,
    ensure_venv,
)
from reconciler.config import parse_config

QUICK_LAYOUT = Layout(dags=10, tasks=20, runs=3, deferred_per_dag=5)  # 600 TIs, 50 tracked
FULL = Sampling(repeats=7, heavy_repeats=3, naive_sample=500)
QUICK = Sampling(repeats=2, heavy_repeats=1, naive_sample=20)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.airflow_db_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", default="agentic_bench_airflow", help="database to create (and drop)")
    parser.add_argument("--keep", action="store_true", help="keep the database at the end")
    parser.add_argument("--reuse", action="store_true", help="use the database as kept by --keep")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smallest scale, to check the bench works: {QUICK_LAYOUT.dags} DAGs x {QUICK_LAYOUT.tasks} "
        f"tasks x {QUICK_LAYOUT.runs} runs, few reads; implies --no-record (its figures mean nothing)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"measured incremental reads (confirm: 3x); {FULL.repeats}, --quick {QUICK.repeats}",
    )
    parser.add_argument(
        "--heavy-repeats",
        type=int,
        help=f"measured batch reads; {FULL.heavy_repeats}, --quick {QUICK.heavy_repeats}",
    )
    parser.add_argument(
        "--naive-sample",
        type=int,
        help=f"single reads for the naive figure; {FULL.naive_sample}, --quick {QUICK.naive_sample}",
    )
    parser.add_argument(
        "--runs", type=int, help=f"runs per DAG; {Layout.runs} (1,020,000 TIs), --quick {QUICK_LAYOUT.runs}"
    )
    parser.add_argument("--pg-log", help="PostgreSQL's log file (default: found from the server)")
    parser.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args(argv)
    if not args.db.startswith("agentic_bench_"):
        parser.error("--db must start with agentic_bench_ (it is dropped at the end)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    poll = parse_config({}, os.environ).poll  # the sidecar's settings, as it would read them
    base_layout, base = (QUICK_LAYOUT, QUICK) if args.quick else (Layout(), FULL)
    layout = Layout(
        dags=base_layout.dags,
        tasks=base_layout.tasks,
        runs=args.runs or base_layout.runs,
        deferred_per_dag=base_layout.deferred_per_dag,
    )
    sampling = Sampling(
        repeats=args.repeats or base.repeats,
        heavy_repeats=args.heavy_repeats or base.heavy_repeats,
        naive_sample=args.naive_sample or base.naive_sample,
    )

    began = time.monotonic()
    loadavg = {"start": os.getloadavg()[0]}
    log = ServerLog(Path(args.pg_log) if args.pg_log else server_log_path())
    venv = ensure_venv(AIRFLOW_VERSION)  # waits on the harness's lock while another process installs it
    tmp = Path(tempfile.mkdtemp(prefix="agentic-bench-airflow-"))
    home = tmp / "home"
    timings: dict[str, float] = {}
    try:
        if not (args.reuse and database_exists(args.db)):
            timings.update(prepare(args.db, layout, home, venv, say))
        with connect(args.db) as conn:
            data = contents(conn)
        say(f"{data.task_instances:,} task instances ({data.size} with indexes): {data.states}")

        loadavg["reads"] = os.getloadavg()[0]
        started = time.monotonic()
        log_statements(args.db, on=True)
        with api_server(args.db, home, venv) as server:
            say(f"api-server on {server.url}")
            cases, indexes, build = asyncio.run(
                logged_phase(server.url, args.db, log, layout, poll, sampling)
            )
        loadavg["logged run end"] = os.getloadavg()[0]
        log_statements(args.db, on=False)
        with api_server(args.db, home, venv) as server:
            asyncio.run(quiet_phase(server.url, args.db, cases, layout, poll, sampling))
        timings["reads and EXPLAINs"] = time.monotonic() - started
        loadavg["end"] = os.getloadavg()[0]
        server_errors = exceptions_logged(home / "logs-harness")
    except BaseException:
        say(f"api-server exceptions: {exceptions_logged(home / 'logs-harness')}")
        raise
    finally:
        if args.keep:
            log_statements(args.db, on=False)
        else:
            drop_database(args.db)
        shutil.rmtree(tmp, ignore_errors=True)

    run = Run(
        command=" ".join(["python -m bench.airflow_db_cost", *(argv if argv is not None else sys.argv[1:])]),
        runtime=time.monotonic() - began,
        timings=timings,
        loadavg=loadavg,
        layout=layout,
        contents=data,
        indexes=indexes,
        index_build=build,
        server_errors=server_errors,
        poll=poll,
    )
    section = render(run, cases)
    print(section)
    if not (args.no_record or args.quick):
        write_results(section)
        say(f"recorded in {RESULTS.relative_to(RESULTS.parent.parent)}")
    say(f"done in {run.runtime:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
