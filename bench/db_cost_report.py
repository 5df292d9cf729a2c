"""The markdown section of bench/RESULTS.md for ``bench.airflow_db_cost``: tables, plans, the verdict."""

from __future__ import annotations

import platform
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench.airflow_db_fill import Layout
from bench.explain import is_ti_read
from bench.metadata_db import Contents
from bench.pg_capture import Statement
from bench.read_cost import INDEX, Case, Load, loads
from harness.airflow import AIRFLOW_VERSION
from reconciler.config import PollConfig

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Airflow-side cost at 1,000,000 task instances"


@dataclass(frozen=True)
class Run:
    """What one benchmark run did, beside the measured cases."""

    command: str
    runtime: float  # seconds, all of it
    timings: dict[str, float]  # seconds per phase
    loadavg: dict[str, float]  # 1-minute load average at named moments
    layout: Layout
    contents: Contents
    indexes: list[tuple[str, str]]  # task_instance's own indexes: (name, definition)
    index_build: float  # seconds to build the added updated_at index
    server_errors: Counter[str]  # the api-servers' tracebacks
    poll: PollConfig


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


def loads_table(rows: list[Load], poll: PollConfig, active: int) -> list[str]:
    return [
        f"| strategy ({active:,} active jobs, interval {poll.interval_seconds:g} s, "
        f"resync every {poll.full_resync_seconds:g} s) | cycle (bounds detection latency) | "
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


def recommendation(cases: dict[str, Case], rows: list[Load], poll: PollConfig, active: int) -> str:
    inc, idx, bat, _, naive = rows
    inc_case, bat_case, per_dag = cases["incremental"], cases["batch"], cases["batch per DAG"]
    indexed = cases["incremental + index"]
    scans = sum(1 for _, p in inc_case.plans if not p.uses_index)
    window = poll.full_resync_seconds
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
            f"- What `incremental` costs Airflow {AIRFLOW_VERSION} is real: `task_instance.updated_at` "
            f"has no index, so each read runs {scans} full scans of the table (the first page's rows, and "
            f"the count Airflow adds to every cursor page): {inc_case.rows_examined:,} rows examined per "
            f"read, {inc.rows:,.0f} per second, {inc.sql:,.0f} ms of SQL per second, growing with the "
            f"table, not with the number of jobs. With an index on `updated_at` (which Airflow does not "
            f"ship) the read examines {indexed.rows_examined:,} rows and takes "
            f"{fmt_ms(indexed.latency * 1000)}; SQL falls to {idx.sql:,.0f} ms per second. "
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
        + '. The reconciler treats a failed read as "unknown" and keeps the job. The api-servers\' '
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


def machine() -> str:
    return (
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}; PostgreSQL 15 with default settings "
        "(shared_buffers 128 MB, max_parallel_workers_per_gather 2)"
    )


def render(run: Run, cases: dict[str, Case]) -> str:
    """The whole section, from its heading on."""
    layout, data, poll = run.layout, run.contents, run.poll
    rows = loads(cases, poll, layout.active)
    updated_at_indexed = [n for n, d in run.indexes if "updated_at" in d]
    lag = poll.interval_seconds + poll.overlap_seconds
    changing = max(1, layout.active // 100)  # as bench.metadata_db.touch changes them
    avg = run.loadavg
    out = [
        HEADING,
        "",
        f"Command: `{run.command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {run.runtime:.0f} s in all "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in run.timings.items())}). Machine: {machine()}. "
        f"Load average (1 min): {avg['start']:.2f} at start, {avg['reads']:.2f} when the reads "
        f"began, {avg['logged run end']:.2f} after the logged run, {avg['end']:.2f} at the end: "
        "other test runs shared the 2 cores, so latencies are those of a busy machine.",
        "",
        f"**Data.** Airflow {AIRFLOW_VERSION}'s metadata schema (`airflow db migrate` on PostgreSQL), "
        f"{data.task_instances:,} task instances ({data.size} with indexes): {layout.dags} DAGs x "
        f"{layout.tasks} tasks x {layout.runs} daily runs; "
        + ", ".join(f"{s} {n:,}" for s, n in data.states)
        + f". The reconciler tracks the {layout.active:,} deferred TIs (latest run of every DAG, one trigger "
        f"row each, last updated 30 min to 1 day ago). Before each incremental read the {layout.dags:,} "
        f"running TIs heartbeat and {changing:,} deferred TIs change, so ~{layout.dags + changing:,} rows "
        f"have `updated_at` in the last 5 s. Incremental reads ask for `updated_at_gte = now - {lag:g} s` "
        "(interval + overlap of the sidecar's `[poll]` settings, `reconciler.config.PollConfig`). "
        "Built by bench/airflow_db_fill.py.",
        "",
        "**Method.** The reconciler's own client (`reconciler.airflow.client.AirflowClient`) against the "
        "real `airflow api-server` (1 worker, SimpleAuthManager). The SQL of each read is what PostgreSQL "
        "logged for it (`ALTER DATABASE ... SET log_min_duration_statement = 0`); every statement on "
        '`task_instance` was then re-run under `EXPLAIN (ANALYZE, BUFFERS)`. "Rows examined" counts the '
        "rows the `task_instance` scans read (returned + removed by filters) over all of a read's "
        "statements. Latencies are medians (min-max, n); the logging-off column comes from a second "
        "api-server started after the setting was reset, to show what statement logging adds (the load "
        "changed between the two runs, see above). All other figures come from the logged run (under "
        "concurrency, as in the naive sample, logged durations include waiting for a CPU). PostgreSQL "
        "runs the full scans in parallel (2 workers), so their CPU cost is up to 3x their duration.",
        "",
        *cases_table(cases),
        "",
        'Airflow\'s load per second of reconciler operation, from the logged medians. "Cycle" is the '
        "time between two reads of a job's state, so it bounds how fast a divergence is seen; "
        '"in flight" is the share of time a reconciler request is being served (1.00: the loop reads '
        "back to back, and a strategy that would need more stretches its cycle instead):",
        "",
        *loads_table(rows, poll, layout.active),
        "",
        errors_line(cases, run.server_errors),
        "",
        f"**Indexes.** `task_instance` in Airflow {AIRFLOW_VERSION} has: "
        + ", ".join(f"`{n}`" for n, _ in run.indexes)
        + ". "
        + (
            "**None covers `updated_at`**, so `updated_at >= T` is evaluated by reading the whole table."
            if not updated_at_indexed
            else f"`updated_at` is covered by {', '.join(updated_at_indexed)}."
        )
        + f' The "incremental + index" row adds `CREATE INDEX {INDEX} ON task_instance (updated_at)` '
        f"by hand (built in {run.index_build:.1f} s), then drops it.",
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
    return "\n".join(out)


def write_results(section: str, results: Path = RESULTS, heading: str = HEADING) -> None:
    """Replace the section of ``results`` under ``heading`` (up to the next), or append it."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    lines = text.split("\n")
    try:
        start_at = lines.index(heading)
    except ValueError:
        results.write_text(text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
        return
    end = next((i for i in range(start_at + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = ["", *lines[end:]] if end < len(lines) else []
    new = [*lines[:start_at], *section.rstrip("\n").split("\n"), *tail]
    results.write_text("\n".join(new).rstrip("\n") + "\n")
