"""DAGs the end-to-end tests drive in a real Airflow."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from agentic_airflow.operators import AgenticRunOperator

START = datetime(2026, 1, 1)
# Two children and a grandchild in the job's process group: all must die on stop.
TREE = "sh -c 'sleep 900 & sleep 900 & wait' & sleep 900 & wait"

with DAG(dag_id="e2e_stop", schedule=None, start_date=START, catchup=False):
    AgenticRunOperator(task_id="victim", command=TREE, route_labels=["default"], poll_interval=0.5)
    AgenticRunOperator(task_id="sibling", command=TREE, route_labels=["default"], poll_interval=0.5)

with DAG(dag_id="e2e_exit_codes", schedule=None, start_date=START, catchup=False):
    AgenticRunOperator(
        task_id="exit_zero", command="echo all good; exit 0", agent_id="agent-1", poll_interval=0.5
    )
    AgenticRunOperator(
        task_id="exit_three", command="echo something broke; exit 3", agent_id="agent-1", poll_interval=0.5
    )
