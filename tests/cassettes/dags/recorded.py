"""The DAG whose task instances the Airflow-client cassettes are recorded from (Airflow 2 and 3)."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator

with DAG(dag_id="recorded", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    BashOperator(task_id="sleeper", bash_command="sleep 300")
    BashOperator.partial(task_id="mapped", bash_command="sleep 300").expand(env=[{"N": "0"}, {"N": "1"}])
