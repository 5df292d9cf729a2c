"""The exit benchmark's DAG: remote jobs that end by themselves, each writing when its command ended."""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG

from agentic_airflow.operators import AgenticRunOperator

MARKS = os.environ.get("BENCH_EXIT_MARKS", "/tmp/bench-exit-marks")
TASKS = int(os.environ.get("BENCH_EXIT_TASKS", "20"))

with DAG(dag_id="bench_exit", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    for i in range(TASKS):
        # Ends 6 to 15 s after it starts; the last thing it does is write the moment it ended.
        AgenticRunOperator(
            task_id=f"job_{i:02d}",
            command=f"sleep {6 + (7 * i) % 10}.{i % 10}; date +%s.%N > {MARKS}/job_{i:02d}",
            route_labels=["default"],
        )
