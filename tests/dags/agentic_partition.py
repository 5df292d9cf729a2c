"""The DAG of tests/test_airflow_partition.py and bench/partition.py: one at_most_once job that may
run on either agent of the pool, and one retry, which must never overlap the first try.

The job is a process group of three (a shell, a sub-shell and two sleeps), each ended by SIGTERM.
"""

from __future__ import annotations

from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from agentic_airflow.operators import AgenticRunOperator

TREE = "sh -c 'sleep 900 & wait' & sleep 900 & wait"

with DAG(dag_id="partition_fence", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    AgenticRunOperator(
        task_id="write",
        command=TREE,
        route_labels=["partition"],
        at_most_once=True,
        poll_interval=1,
        retries=1,
        retry_delay=timedelta(seconds=1),
    )
