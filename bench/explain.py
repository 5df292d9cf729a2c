"""``EXPLAIN (ANALYZE, BUFFERS)`` of the statements an api-server ran for one read.

Statements come from PostgreSQL's log (``bench.pg_capture.ServerLog``) with their parameters inlined,
so they are re-run as logged, on the benchmark's own connection.
"""

from __future__ import annotations

import re

import psycopg

from bench.pg_capture import PlanSummary, Statement, summarise

TI_READ = re.compile(r"\bFROM task_instance\b")

Explained = list[tuple[Statement, PlanSummary]]


def is_ti_read(s: Statement) -> bool:
    return s.kind in ("SELECT", "WITH") and bool(TI_READ.search(s.sql))


def explain(conn: psycopg.Connection, sql: str, indexes: set[str]) -> PlanSummary:
    """Run ``sql`` under EXPLAIN ANALYZE twice (JSON for the numbers, text for the key lines)."""
    plan_json = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}".encode()).fetchone()
    plan_text = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}".encode()).fetchall()
    assert plan_json is not None
    return summarise(plan_json[0], "\n".join(r[0] for r in plan_text), "task_instance", indexes)


def explain_read(
    conn: psycopg.Connection, statements: list[Statement], indexes: set[str]
) -> tuple[Explained, Explained]:
    """Every ``task_instance`` read of one request's statements, and one of each other SELECT shape."""
    plans: Explained = []
    others: Explained = []
    seen: set[str] = set()
    for stmt in statements:
        if is_ti_read(stmt):
            plans.append((stmt, explain(conn, stmt.sql, indexes)))
        elif stmt.kind == "SELECT" and stmt.shape not in seen:
            seen.add(stmt.shape)
            others.append((stmt, explain(conn, stmt.sql, indexes)))
    return plans, others
