"""The markdown section of bench/RESULTS.md for ``bench.candidate_reads``."""

from __future__ import annotations

import math
import platform
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime

import psutil

from bench.airflow_db_fill import Layout
from bench.candidate_bodies import TRANSIENT
from bench.candidate_cost import READS, Candidate, Scoped
from bench.db_cost_report import access, breakdown, fmt_ms, plan_lines
from bench.metadata_db import Contents
from bench.read_cost import Case
from harness.airflow import AIRFLOW_VERSION
from reconciler.config import PollConfig
from reconciler.core.targeted import CHECK_KEYS

HEADING = "## Candidate reads for a history-independent poll"
SPREADS = (30.0, 300.0)  # seconds over which R3 sweeps every tracked DAG once
GOAL_SQL_MS, GOAL_ROWS = 50.0, 50_000  # per second, issue 12
PLANS_SHOWN = ("R1 transient rows", "R2 deferred count", "R3 one DAG", "check chunk (default)")
TARGETED = "targeted (default): cycle every interval + full check over full_resync_seconds"
# The defaults before "targeted": strategy "incremental", a batch read every 30 s.
FORMER_FULL_RESYNC = 30.0


@dataclass(frozen=True)
class Size:
    """One database measured: its layout, contents, preparation and scopes."""

    layout: Layout
    contents: Contents
    timings: dict[str, float]  # seconds per preparation step
    scoped: list[Scoped]


@dataclass(frozen=True)
class Run:
    command: str
    started: datetime
    runtime: float
    sizes: list[Size]
    loadavg: dict[str, float]  # 1-minute load average at named moments
    postgres: str  # server version and the settings that matter
    poll: PollConfig


@dataclass(frozen=True)
class PerSecond:
    scheme: str
    cycle: float  # seconds between two reads of a job's state
    requests: float
    api: float  # api-server seconds per second (client-side latency)
    sql: float  # ms per second
    rows: float  # task_instance rows examined per second
    audit_rows: float  # rows written to Airflow's ``log`` table per second
    audit_bytes: float  # their bytes per second


def per_read(c: Candidate) -> tuple[float, float, float, float, float]:
    """(latency s, SQL ms, rows examined, audit rows, audit bytes) of one read (medians, means for audit)."""
    return c.latency, c.sql_ms, float(c.rows_examined), c.audit_rows, c.audit_bytes


def schemes(cases: dict[str, Candidate], poll: PollConfig, jobs: int) -> list[PerSecond]:
    """Airflow's load per second of operation with ``jobs`` tracked jobs, from the logged medians."""
    interval, window = poll.interval_seconds, poll.full_resync_seconds
    r1, r2, r3 = cases["R1 transient rows"], cases["R2 deferred count"], cases["R3 all DAGs"]
    inc, bat = cases["incremental (today)"], cases["batch (today)"]
    out = []
    cycle = max(interval, r1.latency + r2.latency)
    base = [(a + b) / cycle for a, b in zip(per_read(r1), per_read(r2), strict=True)]
    out.append(PerSecond("R1 + R2 every cycle", cycle, 2 / cycle, *base))
    for spread in SPREADS:
        extra = [x / spread for x in per_read(r3)]
        out.append(
            PerSecond(
                f"R1 + R2 every cycle, R3 over {spread:g} s",
                cycle,
                2 / cycle + r3.per_read / spread,
                *[a + b for a, b in zip(base, extra, strict=True)],
            )
        )
    if "targeted cycle (default)" in cases:  # absent from runs saved before it was measured
        # The default: a steady cycle per max(interval, its latency); the rolling full check reads
        # every tracked run once per full_resync_seconds, ceil(jobs / CHECK_KEYS) chunk requests.
        tc, ck = cases["targeted cycle (default)"], cases["check chunk (default)"]
        tcycle, chunks = max(interval, tc.latency), math.ceil(jobs / CHECK_KEYS)
        out.append(
            PerSecond(
                TARGETED,
                tcycle,
                tc.per_read / tcycle + ck.per_read * chunks / window,
                *[t / tcycle + c * chunks / window for t, c in zip(per_read(tc), per_read(ck), strict=True)],
            )
        )
    # Before: incremental cycles of max(interval, latency), one batch read per former full-resync window.
    window = FORMER_FULL_RESYNC
    icycle = max(interval, inc.latency)
    if bat.latency >= window:
        bcycle = max(interval, bat.latency)
        out.append(
            PerSecond(
                "before: batch back to back",
                bcycle,
                bat.per_read / bcycle,
                *[x / bcycle for x in per_read(bat)],
            )
        )
    else:
        n = (window - bat.latency) / icycle
        out.append(
            PerSecond(
                f"before: incremental every cycle + batch every {window:g} s",
                icycle,
                (bat.per_read + n * inc.per_read) / window,
                *[(b + n * i) / window for b, i in zip(per_read(bat), per_read(inc), strict=True)],
            )
        )
    return out


def _scheme(scoped: Scoped, poll: PollConfig, prefix: str) -> PerSecond:
    return next(x for x in schemes(scoped.cases, poll, len(scoped.scope.keys)) if x.scheme.startswith(prefix))


def _trigger_share(c: Candidate) -> float:
    """Share of a read's SQL time spent on Airflow's one-per-row ``trigger`` lookups."""
    spent = statistics.median(sum(s.ms for s in run if "FROM trigger" in s.sql) for run in c.runs)
    return spent / c.sql_ms if c.sql_ms else 0.0


def findings(run: Run) -> list[str]:
    """What the tables say, in numbers (10,000-job scope unless stated)."""
    poll, out = run.poll, []
    big = [(s, s.scoped[0]) for s in run.sizes]  # the full scope of every size
    base = [_scheme(sc, poll, "R1 + R2 every cycle") for _, sc in big]
    slow = [_scheme(sc, poll, f"R1 + R2 every cycle, R3 over {SPREADS[-1]:g}") for _, sc in big]
    if len(big) > 1:
        out.append(
            "- **History.** R1 + R2 every cycle: "
            + " against ".join(
                f"{b.sql:,.1f} ms of SQL and {_n(b.rows)} rows examined per s at {label(*x)}"
                for b, x in zip(base, big, strict=True)
            )
            + f" (SQL {base[-1].sql / base[0].sql - 1:+.1%}, rows {base[-1].rows / base[0].rows - 1:+.1%}); "
            f"with R3 over {SPREADS[-1]:g} s: SQL {slow[-1].sql / slow[0].sql - 1:+.1%}. R1 reaches the "
            "transient TIs of all of Airflow through `ti_state` (or `ti_dag_run` when few runs are tracked) "
            "and R2 the deferred ones; finished history is never read."
        )
    for (size, sc), b in zip(big, base, strict=True):
        r2, r3 = sc.cases["R2 deferred count"], sc.cases["R3 all DAGs"]
        rows_stmt = [(st, pl) for st, pl in r2.plans if "count(*)" not in st.sql]
        spare = GOAL_SQL_MS - b.sql
        period = f"{r3.sql_ms / spare:,.0f} s" if spare > 0 else "none (R1 + R2 alone exceed it)"
        out.append(
            f"- **{label(size, sc)}.** R2's rows statement (`LIMIT 0`) examined "
            f"{_n(sum(pl.rows_examined for _, pl in rows_stmt))} rows (never executed) but was still sent "
            f"and planned: {', '.join(fmt_ms(st.ms) for st, _ in rows_stmt)} logged (planning "
            f"{', '.join(fmt_ms(pl.planning_ms) for _, pl in rows_stmt)}); the count itself examines every "
            f"tracked deferred TI. A full R3 check costs {fmt_ms(r3.sql_ms)} of SQL and "
            f"{fmt_ms(r3.latency * 1000)} of API time, {_trigger_share(r3):.0%} of that SQL in one `trigger` "
            f"lookup per returned deferred TI; the shortest R3 period that keeps R1 + R2 + R3 within "
            f"{GOAL_SQL_MS:g} ms of SQL per s is {period}."
        )
    small = [(s, s.scoped[-1]) for s in run.sizes if len(s.scoped) > 1]
    for size, sc in small:
        b = _scheme(sc, poll, "R1 + R2 every cycle")
        r1 = sc.cases["R1 transient rows"]
        planning = sum(pl.planning_ms for _, pl in r1.plans)
        executing = sum(pl.execution_ms for _, pl in r1.plans)
        out.append(
            f"- **{label(size, sc)}.** {b.sql:,.1f} ms of SQL and {_n(b.rows)} rows examined per s. Of an "
            f"R1 request's {fmt_ms(r1.sql_ms)}, {fmt_ms(r1.sql_ms - r1.ti_sql_ms)} is outside "
            "`task_instance` (session BEGIN/COMMITs, pool pre-pings, the token revocation check, the "
            f"readable-DAGs lookup, the audit INSERT) and its two `task_instance` statements ran "
            f"{fmt_ms(executing)} and planned {fmt_ms(planning)} under EXPLAIN (Airflow's eager-loading "
            "joins): a floor per request, whatever the number of jobs."
        )
    if len(big) > 1 and "targeted cycle (default)" in big[0][1].cases:
        t = [_scheme(sc, poll, TARGETED) for _, sc in big]
        t_small = [(s, _scheme(sc, poll, TARGETED)) for s, sc in small]
        out.append(
            f"- **Targeted default.** A steady cycle every {poll.interval_seconds:g} s plus the full check "
            f"over {poll.full_resync_seconds:g} s: "
            + " against ".join(
                f"{x.sql:,.1f} ms of SQL and {_n(x.rows)} rows examined per s "
                f"({x.requests:.2f} requests, {x.api:.3f} API-server s) at {label(*b)}"
                for x, b in zip(t, big, strict=True)
            )
            + f" (SQL {t[-1].sql / t[0].sql - 1:+.1%}, rows {t[-1].rows / t[0].rows - 1:+.1%}), "
            + ("within" if all(x.sql <= GOAL_SQL_MS and x.rows <= GOAL_ROWS for x in t) else "not within")
            + " the goal. At "
            + "; ".join(
                f"{label(s, sc)}: {x.sql:,.1f} ms of SQL, {_n(x.rows)} rows examined, {x.requests:.2f} "
                f"requests and {x.api:.3f} API-server s per s"
                for (s, sc), (_, x) in zip(small, t_small, strict=True)
            )
            + "."
        )
    r1 = big[0][1].cases["R1 transient rows"]
    out.append(
        f"- **Writes.** Every POST to the API writes and commits one row in Airflow's audit table `log`, the "
        f"request body in `extra` ({r1.audit_bytes / 1024:,.1f} KiB per R1 request at "
        f"{len(big[0][1].scope.keys):,} jobs): R1 + R2 every second add {base[0].audit_rows * 86400:,.0f} "
        f"rows ({base[0].audit_bytes * 86400 / 2**20:,.0f} MiB) a day, which only `airflow db clean` "
        "removes. Today's incremental read is a GET and writes nothing."
    )
    return out


def _n(x: float) -> str:
    return f"{x:,.0f}"


def request_rows(label: str, scoped: Scoped) -> list[str]:
    rows = []
    for name, c in scoped.cases.items():
        n = c.per_read
        statements = statistics.median(len(run) for run in c.runs)
        total = f" (total_entries {_n(statistics.median(c.totals))})" if c.totals else ""
        per_request = (
            f"; per request {fmt_ms(c.latency * 1000 / n)}, {fmt_ms(c.sql_ms / n)} SQL, "
            f"{_n(c.rows_examined / n)} rows"
            if n > 1
            else ""
        )
        rows.append(
            f"| {label} | {name} | {n} | {_n(statistics.median(c.returned))}{total} | "
            f"{_n(statements)}: {breakdown(c.runs[0]).split(': ', 1)[1]} | {fmt_ms(c.sql_ms)} "
            f"({fmt_ms(c.ti_sql_ms)}) | {_n(c.rows_examined)} | "
            f"{fmt_ms(c.latency * 1000)} (n={len(c.latencies)}){per_request} | "
            f"{c.audit_rows:,.0f} ({c.audit_bytes / 1024:,.1f} KiB) | {access(c)} |"
        )
    return rows


def second_rows(label: str, scoped: Scoped, poll: PollConfig) -> list[str]:
    out = []
    for s in schemes(scoped.cases, poll, len(scoped.scope.keys)):
        meets = s.sql <= GOAL_SQL_MS and s.rows <= GOAL_ROWS
        out.append(
            f"| {label} | {s.scheme} | {fmt_ms(s.cycle * 1000)} | {s.requests:.2f} | {s.api:.3f} | "
            f"{s.sql:,.1f} | {_n(s.rows)} | {'yes' if meets else 'no'} | {s.audit_rows * 86400:,.0f} "
            f"({s.audit_bytes * 86400 / 2**20:,.0f} MiB) |"
        )
    return out


def label(size: Size, scoped: Scoped) -> str:
    return f"{size.contents.task_instances / 1e6:.2f} M TIs, {len(scoped.scope.keys):,} jobs"


def machine(postgres: str) -> str:
    return (
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}; {postgres}"
    )


def render(run: Run) -> str:
    poll = run.poll
    first = run.sizes[0].layout
    states = ", ".join("null" if s is None else s for s in TRANSIENT)
    avg = "; ".join(f"{k} {v:.2f}" for k, v in run.loadavg.items())
    out = [
        HEADING,
        "",
        f"Command: `{run.command}`, started {run.started:%Y-%m-%d %H:%M} UTC (`date -u`), "
        f"{run.runtime:.0f} s in all ("
        + "; ".join(
            f"{s.contents.task_instances:,} TIs: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.timings.items())
            for s in run.sizes
        )
        + f"). Machine: {machine(run.postgres)}. Load average (1 min): {avg}. The 2 cores were "
        "shared with whatever else ran (test runs at times): latencies are those of that machine.",
        "",
        f"**Data.** Airflow {AIRFLOW_VERSION}'s schema (`airflow db migrate`), filled by "
        f"bench/airflow_db_fill.py as in the section above ({first.dags} DAGs x {first.tasks} tasks, "
        f"{first.deferred_per_dag} deferred TIs per DAG in the latest run, each with a trigger row, task "
        f"{first.deferred_per_dag} running and heartbeating), plus, in each DAG's latest run, "
        f"{first.waiting_per_dag} task scheduled (even DAGs) or queued (odd DAGs) and "
        f"{first.pending_per_dag} tasks not yet run (state null): "
        f"{first.dags * first.waiting_per_dag:,} scheduled/queued and "
        f"{first.dags * first.pending_per_dag:,} null TIs, none of them tracked, as in a live Airflow.",
        "",
        *(
            f"- {s.layout.runs} runs per DAG: {s.contents.task_instances:,} task instances "
            f"({s.contents.size} with indexes): " + ", ".join(f"{st} {n:,}" for st, n in s.contents.states)
            for s in run.sizes
        ),
        "",
        "**Tracked jobs.** 10,000: every deferred TI (200 DAGs' latest runs, tasks 0-49: 200 DAG ids, 200 "
        "run ids, 50 task ids in each list). 100: the deferred TIs of the first 2 DAGs' latest runs "
        "(2 DAG ids, 2 run ids, 50 task ids).",
        "",
        "**Reads.** All through `POST /api/v2/dags/~/dagRuns/~/taskInstances/list` with the tracked lists "
        "(`dag_ids`, `dag_run_ids`, `task_ids`):",
        "",
        *(f"- **{name}**: {what}." for name, what in READS.items()),
        "",
        f"R1's `state` list is [{states}]. R3 one DAG rotates over the tracked DAGs, one per read, and "
        "the check chunk over the chunks of one round of the full check (one per read). "
        "The candidates are POSTed with aiohttp after `POST /auth/token` (the JWT login of "
        "`reconciler.airflow.client.AirflowClient`); today's reads and the default's go through that client, "
        "the default's through the project's own code (`reconciler.core.targeted`): one `TargetedRead` per "
        "scope, a first read (which also sends a chunk of the full check) as warm-up, then only steady "
        "cycles.",
        "",
        "**Method.** As in the section above: the real `airflow api-server` (1 worker) on the database, "
        "every statement logged by PostgreSQL (`log_min_duration_statement = 0` on this database only); "
        "SQL time is the sum of the logged durations of one read's statements (median over the reads), "
        'statements are counted from the log, and "rows examined" is what the `task_instance` scans of '
        "the first read's statements read under `EXPLAIN (ANALYZE, BUFFERS)` (returned + removed by "
        "filters, all loops). API time is the client-side latency of the read, statement logging on. "
        "Before every read the running TIs heartbeat and 1% of the deferred ones change (`updated_at` "
        "bumped), as in the section above. Rows written to `log`: Airflow's audit table, which gets a row "
        "for every POST to the API (the endpoint's `action_logging` dependency, the request body in "
        "`extra`), counted by `log.id` before and after each read kind; their size is `pg_column_size` "
        "of the rows (after compression, without index entries).",
        "",
        "Per read (one request unless the requests column says otherwise):",
        "",
        "| size, tracked jobs | read | requests | TIs returned | SQL statements | SQL time, server log "
        "(of it on task_instance) | task_instance rows examined | API time (client-side, median) | "
        "rows written to `log` (their size) | task_instance access |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(row for s in run.sizes for sc in s.scoped for row in request_rows(label(s, sc), sc)),
        "",
        f"Per second of operation at interval {poll.interval_seconds:g} s (cycle = max(interval, R1 + R2 "
        "latency)); R3 spread means the full check of every tracked DAG is sent once per that period, "
        "1/period of its cost per second. Today's row uses the same formula as the section above "
        "(incremental each cycle, a batch read every `full_resync_seconds` = "
        f"{FORMER_FULL_RESYNC:g} s, the defaults before `targeted`). The targeted default's row "
        f"(`full_resync_seconds` = {poll.full_resync_seconds:g} s): a targeted cycle per "
        "max(interval, its latency) plus the check chunk's cost x ceil(jobs / "
        f"{CHECK_KEYS:,}) per `full_resync_seconds`. "
        f'"Goal": issue 12\'s <= {GOAL_SQL_MS:g} ms of SQL and <= {GOAL_ROWS:,} rows examined per second.',
        "",
        "| size, tracked jobs | scheme | cycle | requests per s | API-server s per s | SQL ms per s | "
        "task_instance rows examined per s | goal | rows written to `log` per day (their size) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(row for s in run.sizes for sc in s.scoped for row in second_rows(label(s, sc), sc, poll)),
        "",
        "Reading the figures:",
        "",
        *findings(run),
        "",
        "Plans of the candidate reads, key lines (first read of each; other SELECTs with their count):",
        "",
        "```",
    ]
    for s in run.sizes:
        for sc in s.scoped:
            out.append(f"#### {label(s, sc)}")
            picked: dict[str, Case] = {k: sc.cases[k] for k in PLANS_SHOWN}
            out.extend(plan_lines(picked))
    out += ["```", ""]
    return "\n".join(out)


def started_now() -> datetime:
    return datetime.now(UTC)
