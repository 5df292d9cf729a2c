"""The DAG whose task instances the Airflow-client cassettes are recorded from (Airflow 2 and 3)."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator
    from airflow.sensors.date_time import DateTimeSensorAsync

with DAG(dag_id="recorded", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    sleeper = BashOperator(task_id="sleeper", bash_command="sleep 300")
    BashOperator.partial(task_id="mapped", bash_command="sleep 300").expand(env=[{"N": "0"}, {"N": "1"}])
    # No state while the sleeper runs, and deferred for good: the targeted reads' states.
    sleeper >> BashOperator(task_id="waiting", bash_command="true")
    DateTimeSensorAsync(task_id="parked", target_time="2099-01-01T00:00:00+00:00")
