"""The DAG of tests/test_airflow_fleet.py: one long job pinned to each of three agents.

The test crashes one agent, pauses another, and the third must go on untouched. No retries: a task
whose agent is lost fails for good, so its state says exactly what the loss did.
"""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from agentic_airflow.operators import AgenticRunOperator

# A shell with a sub-shell of two sleeps and one more sleep: a process group of five.
TREE = "sh -c 'sleep 900 & sleep 900 & wait' & sleep 900 & wait"
AGENTS = ("agent-a", "agent-b", "agent-c")


def task_id(agent_id: str) -> str:
    return "on_" + agent_id.replace("-", "_")


with DAG(dag_id="fleet_loss", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    for agent in AGENTS:
        AgenticRunOperator(task_id=task_id(agent), command=TREE, agent_id=agent, poll_interval=1, retries=0)
