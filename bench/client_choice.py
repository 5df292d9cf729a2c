"""Why the reconciler talks to Airflow with aiohttp directly, not apache-airflow-client.

    pip install 'apache-airflow-client==3.3.2'   # once, into the project venv
    python -m bench.client_choice

Parses one 1,000-task-instance page (copies of a task instance recorded from a real Airflow
3.3.2) with the official client's models and with the reconciler's own parser, and times both.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from bench.standins import recorded_task_instance
from reconciler.airflow.task_instances import parse_task_instance

PAGE = 1000
ROUNDS = 20


def page_text() -> str:
    template = recorded_task_instance()
    items = [{**template, "task_id": f"task_{i}", "map_index": i} for i in range(PAGE)]
    return json.dumps({"task_instances": items, "total_entries": PAGE})


def timed(fn: Any, text: str) -> float:
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        fn(text)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def ours(text: str) -> list[Any]:
    return [parse_task_instance(item) for item in json.loads(text)["task_instances"]]


def main() -> int:
    try:
        from airflow_client.client.models import TaskInstanceCollectionResponse
    except ImportError:
        print("needs apache-airflow-client: pip install 'apache-airflow-client==3.3.2'", file=sys.stderr)
        return 2
    text = page_text()
    official_ms = timed(TaskInstanceCollectionResponse.from_json, text)
    ours_ms = timed(ours, text)
    print(f"| parser | ms per {PAGE}-task-instance page (median of {ROUNDS}) |")
    print("|---|---|")
    official = "apache-airflow-client 3.3.2 models (`TaskInstanceCollectionResponse.from_json`)"
    print(f"| {official} | {official_ms:.1f} |")
    print(f"| json.loads + reconciler.airflow.client.parse_task_instance | {ours_ms:.1f} |")
    print(f"\nratio: {official_ms / ours_ms:.1f}x; page size {len(text) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
