"""The real-Airflow latency benchmark's DAG: 50 remote jobs, and local tasks as the anchor."""

from __future__ import annotations

from datetime import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

from agentic_airflow.operators import AgenticRunOperator

with DAG(dag_id="bench_latency", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    for i in range(50):
        AgenticRunOperator(
            task_id=f"remote_{i:02d}",
            command="sleep 900 & sleep 900 & wait",
            route_labels=["default"],
            poll_interval=5.0,
        )
    for i in range(10):
        # Airflow's own reaction to "mark failed": it kills a task that runs locally on a worker.
        BashOperator(task_id=f"local_{i}", bash_command="exec sleep 900")
