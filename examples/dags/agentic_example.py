"""Example: two remote jobs in one DAG run, each run by an agent and stopped if the task is marked failed."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from agentic_airflow.operators import AgenticRunOperator

with DAG(dag_id="agentic_example", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
    # A long job: mark it failed in the UI and the sidecar stops it on its agent.
    AgenticRunOperator(
        task_id="long_job",
        command="echo started; sleep 600 & sleep 600 & wait",
        route_labels=["default"],
        poll_interval=1.0,
    )
    # A sibling nobody touches: it keeps running.
    AgenticRunOperator(
        task_id="sibling_job",
        command="echo started; sleep 600 & sleep 600 & wait",
        route_labels=["default"],
        poll_interval=1.0,
    )
