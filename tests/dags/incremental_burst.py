"""DAGs of the incremental-read test: hundreds of task instances changing at once, and a task to mark.

Imports under Airflow 3 and 2 (the e2e Airflows parse this folder too).
"""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator
    from airflow.operators.empty import EmptyOperator

from agentic_airflow.operators import AgenticRunOperator

START = datetime(2026, 1, 1)
BURST = 300

with DAG(dag_id="incremental_burst", schedule=None, start_date=START, catchup=False):
    # The gate holds the burst back until the test marks it success; the scheduler then finishes
    # every EmptyOperator task itself (no worker), all within a second or two.
    gate = BashOperator(task_id="gate", bash_command="sleep 900")
    gate >> [EmptyOperator(task_id=f"burst_{n:03d}") for n in range(BURST)]

with DAG(dag_id="incremental_marked", schedule=None, start_date=START, catchup=False):
    AgenticRunOperator(task_id="marked", command="sleep 900", route_labels=["default"], poll_interval=0.5)
