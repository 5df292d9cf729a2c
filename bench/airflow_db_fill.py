"""Fill an Airflow 3.3.2 metadata database (already migrated) with a realistic history, in SQL.

Layout (defaults): 200 daily DAGs x 100 tasks x 51 runs = 1,020,000 task instances.

- Runs 1..50 of every DAG are finished: ~98.5% success, the rest failed, upstream_failed or skipped,
  with ``updated_at`` = their end (between 1 and 50 days ago).
- The latest run of every DAG is running: tasks 0..49 are ``deferred`` (the reconciler's jobs:
  10,000 TIs, each with its own trigger row, updated about half an hour to a day ago), task 50 is
  ``running`` (an ordinary task whose heartbeats keep bumping ``updated_at``), the rest succeeded.
  Optionally (``waiting_per_dag``, ``pending_per_dag``, 0 by default) the tasks after 50 are
  ``scheduled`` (even DAGs) or ``queued`` (odd DAGs), and the last ones have no state yet (not yet run):
  the transient rows every live Airflow has.
- Every DAG has its own schedule offset (7 minutes apart), so run ids differ between DAGs.

Ids are UUID7 like Airflow's (time-ordered by creation), rows reference a dag_version, a scheduler
job and a dag_bundle as Airflow's own rows do. Foreign-key triggers are skipped during the bulk load
(``session_replication_role = replica``): the rows are consistent by construction.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg


@dataclass(frozen=True)
class Layout:
    dags: int = 200
    tasks: int = 100
    runs: int = 51
    deferred_per_dag: int = 50  # tasks 0..deferred_per_dag-1 of the latest run are deferred
    # In the latest run, after the running task: this many scheduled (even DAGs) or queued (odd DAGs),
    # and the last ``pending_per_dag`` tasks not run yet (state NULL). 0 keeps the layout of 2026-11-24.
    waiting_per_dag: int = 0
    pending_per_dag: int = 0

    @property
    def task_instances(self) -> int:
        return self.dags * self.tasks * self.runs

    @property
    def active(self) -> int:
        return self.dags * self.deferred_per_dag

    def dag_id(self, dag_no: int) -> str:
        return f"dag_{dag_no:03d}"

    def task_id(self, task_no: int) -> str:
        return f"task_{task_no:03d}"


UUID7 = """
CREATE FUNCTION pg_temp.uuid7(ts timestamptz) RETURNS uuid LANGUAGE sql VOLATILE AS $$
  SELECT (substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || substr(r, 16, 3) || substr(r, 19))::uuid
  FROM (SELECT lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') AS h,
               gen_random_uuid()::text AS r) AS s
$$
"""


def fill_statements(layout: Layout) -> list[tuple[str, str]]:
    """(label, SQL) in order. Only integers from ``layout`` are formatted into the SQL."""
    d, t, r, a = layout.dags, layout.tasks, layout.runs, layout.deferred_per_dag
    w, p = layout.waiting_per_dag, layout.pending_per_dag
    assert a + 1 + w + p <= t, "deferred, running, waiting and pending tasks must fit in a run"
    executor_config = pickle.dumps({}).hex()  # what Airflow stores for an empty executor_config
    return [
        ("session", "SET session_replication_role = replica"),
        ("uuid7", UUID7),
        (
            "dag_bundle, job",
            """
            INSERT INTO dag_bundle (name, active, last_refreshed) VALUES ('dags-folder', true, now());
            INSERT INTO job (id, state, job_type, start_date, latest_heartbeat, executor_class,
                             hostname, unixname)
            VALUES (1, 'running', 'SchedulerJob', now() - interval '60 days', now(), 'LocalExecutor',
                    'airflow-1', 'airflow'),
                   (2, 'running', 'TriggererJob', now() - interval '60 days', now(), NULL,
                    'airflow-1', 'airflow');
            SELECT setval('job_id_seq', 2);
            """,
        ),
        (
            "dag, dag_version",
            f"""
            INSERT INTO dag (dag_id, is_paused, is_stale, bundle_name, fileloc, relative_fileloc, owners,
                             timetable_type, timetable_summary, timetable_description, partition_mapper_info,
                             max_active_tasks, max_active_runs, max_consecutive_failed_dag_runs,
                             has_task_concurrency_limits, last_parsed_time, last_parse_duration)
            SELECT format('dag_%s', lpad(n::text, 3, '0')), false, false, 'dags-folder',
                   format('/opt/airflow/dags/dag_%s.py', lpad(n::text, 3, '0')),
                   format('dag_%s.py', lpad(n::text, 3, '0')), 'airflow',
                   'airflow.timetables.interval.CronDataIntervalTimetable',
                   format('%s 0 * * *', n * 7 % 60), 'daily', '{{}}', 16, 16, 0, false, now(), 0.2
            FROM generate_series(0, {d - 1}) AS n;
            INSERT INTO dag_version (id, version_number, dag_id, bundle_name, created_at, last_updated)
            SELECT gen_random_uuid(), 1, dag_id, 'dags-folder', now() - interval '60 days', now()
            FROM dag;
            """,
        ),
        (
            "dag_run",
            f"""
            INSERT INTO dag_run (dag_id, queued_at, logical_date, start_date, end_date, state, run_id,
                                 run_type, triggered_by, conf, data_interval_start, data_interval_end,
                                 run_after, last_scheduling_decision, log_template_id, created_at, updated_at,
                                 clear_number, created_dag_version_id, span_status)
            SELECT g.dag_id, g.ra, g.ld, g.ra,
                   CASE WHEN g.latest THEN NULL ELSE g.ra + interval '40 minutes' END,
                   CASE WHEN g.latest THEN 'running' ELSE 'success' END,
                   'scheduled__' || to_char(g.ld AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00',
                   'scheduled', 'TIMETABLE', '{{}}', g.ld, g.ra, g.ra,
                   CASE WHEN g.latest THEN now() ELSE g.ra + interval '40 minutes' END,
                   2, g.ra, CASE WHEN g.latest THEN now() ELSE g.ra + interval '40 minutes' END,
                   0, g.version_id, 'not_started'
            FROM (
                SELECT v.dag_id, v.id AS version_id, k = {r - 1} AS latest,
                       date_trunc('minute', now()) - interval '1 day' * ({r} - k) - interval '30 minutes'
                         - interval '7 minutes' * substr(v.dag_id, 5)::int AS ld,
                       date_trunc('minute', now()) - interval '1 day' * ({r} - k - 1) - interval '30 minutes'
                         - interval '7 minutes' * substr(v.dag_id, 5)::int AS ra
                FROM dag_version AS v CROSS JOIN generate_series(0, {r - 1}) AS k
            ) AS g;
            """,
        ),
        (
            "trigger",
            f"""
            INSERT INTO trigger (id, classpath, kwargs, created_date, triggerer_id)
            SELECT n * {a} + k + 1, 'agentic_airflow.triggers.AgenticJobTrigger',
                   format('{{"job_id": "job-%s-%s", "conn_id": "agentic_default", "poll_interval": 2.0, '
                          '"log_tail_bytes": 4096}}', n, k),
                   now() - interval '1 hour', 2
            FROM generate_series(0, {d - 1}) AS n CROSS JOIN generate_series(0, {a - 1}) AS k;
            SELECT setval('trigger_id_seq', {d * a + 1});
            """,
        ),
        (
            "task_instance",
            f"""
            INSERT INTO task_instance (id, task_id, dag_id, run_id, map_index, start_date, end_date, duration,
                                       state, try_number, max_tries, hostname, unixname, pool, pool_slots,
                                       queue, priority_weight, operator, queued_dttm, scheduled_dttm,
                                       queued_by_job_id, last_heartbeat_at, pid, executor, executor_config,
                                       updated_at, span_status, trigger_id, next_method, dag_version_id)
            SELECT pg_temp.uuid7(s.ra + s.t * interval '1 millisecond'), s.task_id, s.dag_id, s.run_id, -1,
                   s.started, s.ended, extract(epoch FROM s.ended - s.started), s.state,
                   CASE WHEN s.state IS NULL THEN 0 ELSE 1 END, 0,
                   CASE WHEN s.started IS NULL THEN '' ELSE 'worker-' || (s.t % 4) END,
                   'airflow', 'default_pool', 1, 'default', 1,
                   CASE WHEN s.t < {a} THEN 'AgenticOperator' ELSE 'BashOperator' END,
                   CASE WHEN s.state = 'queued' THEN now() - interval '20 seconds'
                        ELSE s.started - interval '2 seconds' END,
                   CASE WHEN s.state IN ('scheduled', 'queued') THEN now() - interval '30 seconds'
                        ELSE s.started - interval '3 seconds' END,
                   CASE WHEN s.state IS NULL OR s.state = 'scheduled' THEN NULL ELSE 1 END,
                   CASE WHEN s.state = 'running' THEN now() END,
                   CASE WHEN s.state = 'running' THEN 4000 + s.dag_no END,
                   'LocalExecutor', '\\x{executor_config}'::bytea,
                   CASE WHEN s.state = 'running' THEN now()
                        WHEN s.state = 'deferred' THEN s.started + interval '3 seconds'
                        WHEN s.state IN ('scheduled', 'queued') THEN now() - interval '20 seconds'
                        WHEN s.state IS NULL THEN s.ra
                        ELSE s.ended + interval '1 second' END,
                   'not_started',
                   CASE WHEN s.state = 'deferred' THEN s.dag_no * {a} + s.t + 1 END,
                   CASE WHEN s.state = 'deferred' THEN 'execute_complete' END,
                   s.version_id
            FROM (
                SELECT q.*,
                       CASE WHEN q.state IS NULL OR q.state IN ('scheduled', 'queued') THEN NULL
                            ELSE q.ra + interval '10 seconds' + interval '2 seconds' * q.t END AS started,
                       CASE WHEN q.state IS NULL OR q.state IN ('deferred', 'running', 'scheduled', 'queued')
                            THEN NULL
                            ELSE q.ra + interval '40 seconds' + interval '2 seconds' * q.t
                                 + interval '1 second' * (q.t % 60) END AS ended
                FROM (
                    SELECT dr.dag_id, dr.run_id, dr.run_after AS ra, dr.created_dag_version_id AS version_id,
                           substr(dr.dag_id, 5)::int AS dag_no, k AS t,
                           format('task_%s', lpad(k::text, 3, '0')) AS task_id,
                           CASE WHEN dr.state = 'running' AND k < {a} THEN 'deferred'
                                WHEN dr.state = 'running' AND k = {a} THEN 'running'
                                WHEN dr.state = 'running' AND k <= {a + w} THEN
                                    CASE WHEN substr(dr.dag_id, 5)::int % 2 = 0 THEN 'scheduled'
                                         ELSE 'queued' END
                                WHEN dr.state = 'running' AND k >= {t - p} THEN NULL
                                WHEN dr.state = 'running' THEN 'success'
                                ELSE coalesce((ARRAY['failed', 'upstream_failed', 'skipped'])[
                                         abs(hashtext(dr.run_id || dr.dag_id || k)) % 200 + 1], 'success')
                           END AS state
                    FROM dag_run AS dr CROSS JOIN generate_series(0, {t - 1}) AS k
                ) AS q
            ) AS s
            ORDER BY s.ra, s.t;
            """,
        ),
        (
            "rendered_task_instance_fields",
            """
            INSERT INTO rendered_task_instance_fields (dag_id, task_id, run_id, map_index, rendered_fields)
            SELECT ti.dag_id, ti.task_id, ti.run_id, ti.map_index,
                   '{"bash_command": "echo hello", "env": null}'::json
            FROM task_instance AS ti JOIN dag_run AS dr USING (dag_id, run_id)
            WHERE dr.state = 'running';
            """,
        ),
        ("session", "SET session_replication_role = DEFAULT"),
    ]


def fill(conn: psycopg.Connection, layout: Layout, log: Callable[[str], None] = print) -> dict[str, float]:
    """Run the fill on an autocommit connection; seconds per step."""
    timings: dict[str, float] = {}
    for label, sql in fill_statements(layout):
        started = time.monotonic()
        conn.execute(sql.encode())  # bytes: psycopg sends it as is (no placeholder parsing)
        timings[label] = timings.get(label, 0.0) + time.monotonic() - started
        if label not in ("session", "uuid7"):
            log(f"  filled {label} in {timings[label]:.1f} s")
    return timings
