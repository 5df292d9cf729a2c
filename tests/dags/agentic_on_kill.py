"""The DAG of tests/test_airflow_on_kill.py: three long jobs, one for each action a person can take,
and one whose execution_timeout runs out."""

from __future__ import annotations

from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from agentic_airflow.operators import AgenticRunOperator

ACTIONS = ("marked_failed", "marked_success", "cleared")

with DAG(dag_id="on_kill", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    for action in ACTIONS:
        AgenticRunOperator(task_id=action, command="sleep 900", poll_interval=2, retries=0)
    AgenticRunOperator(
        task_id="timed_out",
        command="sleep 900",
        poll_interval=2,
        retries=0,
        execution_timeout=timedelta(seconds=8),
    )
