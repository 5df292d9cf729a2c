"""DAGs the end-to-end tests drive in a real Airflow (3.x and 2.x: the file imports under both)."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from agentic_airflow.callbacks import enable_router_callbacks
from agentic_airflow.operators import AgenticRunOperator

START = datetime(2026, 1, 1)
# Two children and a grandchild in the job's process group: all must die on stop.
TREE = "sh -c 'sleep 900 & sleep 900 & wait' & sleep 900 & wait"


def victim_and_sibling(dag_id: str) -> DAG:
    """A task the test acts on, and one beside it in the same run that must never be touched."""
    with DAG(dag_id=dag_id, schedule=None, start_date=START, catchup=False) as dag:
        AgenticRunOperator(task_id="victim", command=TREE, route_labels=["default"], poll_interval=0.5)
        AgenticRunOperator(task_id="sibling", command=TREE, route_labels=["default"], poll_interval=0.5)
    return dag


stop_dag = victim_and_sibling("e2e_stop")  # mark failed, mark success
clear_dag = victim_and_sibling("e2e_clear")  # clear the deferred victim: it runs again as a new try

with DAG(dag_id="e2e_delete", schedule=None, start_date=START, catchup=False):
    # Two runs: one is deleted, the other must keep its job.
    AgenticRunOperator(task_id="work", command=TREE, route_labels=["default"], poll_interval=0.5)

with DAG(dag_id="e2e_exit_codes", schedule=None, start_date=START, catchup=False) as exit_codes:
    AgenticRunOperator(
        task_id="exit_zero", command="echo all good; exit 0", agent_id="agent-1", poll_interval=0.5
    )
    AgenticRunOperator(
        task_id="exit_three", command="echo something broke; exit 3", agent_id="agent-1", poll_interval=0.5
    )
# The optional fast path: Airflow runs the failure callback, which tells the sidecar (and says so in XCom).
enable_router_callbacks(exit_codes)

with DAG(dag_id="e2e_output", schedule=None, start_date=START, catchup=False):
    # Prints a numbered line every half second for a minute: the task's log shows them as they come.
    AgenticRunOperator(
        task_id="chatty",
        command='for i in $(seq 1 120); do echo "remote line $i"; sleep 0.5; done',
        route_labels=["default"],
        poll_interval=0.5,
    )
