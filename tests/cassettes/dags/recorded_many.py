"""More task instances than one list page holds (100 on Airflow 3), for the paging cassettes."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.empty import EmptyOperator

MANY = 150

with DAG(dag_id="recorded_many", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    # The scheduler finishes EmptyOperator tasks itself: the run ends within seconds, no worker needed.
    for n in range(MANY):
        EmptyOperator(task_id=f"empty_{n:03d}")
