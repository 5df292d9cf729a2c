"""The DAG of tests/test_airflow_submit_sigterm.py: tasks that cannot submit their job (a sidecar that
answers 503, a connection that is not defined, a sidecar that never answers, a port that refuses
connections), so each keeps retrying its submission until it is stopped; and a task that waits on the
hook's long-poll of a job, at a sidecar that never answers."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task

from agentic_airflow.hooks import AgenticRunHook
from agentic_airflow.operators import AgenticRunOperator
from agentic_airflow.sidecar_client import SidecarError

# task id -> its connection (the test defines all but the missing one)
TASKS = {
    "killed_503": "sigterm_503",
    "killed_missing": "sigterm_missing",
    "killed_in_flight": "sigterm_silent",
    "marked_refused": "sigterm_refused",
}
JOB_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

with DAG(dag_id="submit_sigterm", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    for task_id, conn_id in TASKS.items():
        AgenticRunOperator(task_id=task_id, command="sleep 600", conn_id=conn_id, retries=0)

    @task(task_id="hook_long_poll", retries=0)
    def hook_long_poll() -> None:
        """Long-polls the job until the sidecar answers (it never does: each poll times out)."""
        for _ in range(10):
            try:
                AgenticRunHook("sigterm_silent").get_job(JOB_ID, wait=60)
                return
            except SidecarError:
                continue

    hook_long_poll()
