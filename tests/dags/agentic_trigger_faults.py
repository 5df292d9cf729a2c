"""The DAG of tests/test_airflow_trigger_faults.py: deferred tasks whose jobs outlive sidecar faults."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from agentic_airflow.operators import AgenticRunOperator

TASKS = ("marked", "ended", "kept")

with DAG(dag_id="trigger_faults", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    for task_id in TASKS:
        AgenticRunOperator(task_id=task_id, command="sleep 600", route_labels=["default"], poll_interval=1.0)
