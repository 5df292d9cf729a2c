"""Never two copies: a partitioned agent's at_most_once job and its retry on a real Airflow 3.3.2.

The stack of bench/partition.py: Airflow, the sidecar and two registered agents as processes, with
everything between vm-a and the sidecar (both directions) through TCP proxies the test cuts. First a
sidecar outage shorter than ``fence_after_seconds`` (SIGSTOP, SIGCONT): nothing is stopped. Then the
partition: vm-a fences the first try's process group before the sidecar declares vm-a lost; the task
fails and its retry starts on vm-b only after the old copy is gone (read from /proc on both sides:
overlap 0); once healed, vm-a reports why it stopped the job. The figures are printed (``pytest
-s``); bench/RESULTS.md has several runs of the same measurement.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from bench.partition import (
    DAG_ID,
    FENCE_AFTER,
    GRACE,
    LOST_AFTER,
    TASK_ID,
    Stack,
    first_try_on_a,
    partition_once,
    partition_stack,
)
from harness.processes import alive

pytestmark = pytest.mark.airflow

# A fence check (0.4 s), the stop's bookkeeping and a loaded machine's scheduling.
FENCE_MARGIN = 2.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with partition_stack(tmp_path_factory.mktemp("partition")) as stack:
        yield stack


def test_a_sidecar_outage_shorter_than_the_fence_stops_nothing(stack: Stack) -> None:
    job, tree = first_try_on_a(stack, "short-outage")
    assert stack.sidecar.proc is not None
    os.kill(stack.sidecar.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(FENCE_AFTER / 2)
    finally:
        os.kill(stack.sidecar.proc.pid, signal.SIGCONT)
    time.sleep(FENCE_AFTER + 1)  # past the fence, had the outage counted
    assert alive(tree) == tree, "the outage stopped part of the job"
    assert stack.on_agent("vm-a", job["job_id"])["status"] == "RUNNING"
    assert stack.api.task_instance(DAG_ID, "short-outage", TASK_ID)["state"] == "deferred"
    stack.api.mark(DAG_ID, "short-outage", TASK_ID, "success")


def test_a_partitioned_agents_job_and_its_retry_never_overlap(stack: Stack) -> None:
    seen = partition_once(stack, "partition")
    print(
        f"\nfrom the cut: old copy gone {seen.fence:.2f} s, first try failed {seen.failed:.2f} s, "
        f"retry started {seen.retry_start:.2f} s on {seen.retry_agent}, overlap {seen.overlap:.2f} s"
    )
    assert seen.overlap == 0, seen
    assert seen.retry_agent == "vm-b", seen
    # vm-a's last accepted heartbeat precedes the cut by up to one heartbeat: the fence fires between
    # fence_after less that and fence_after plus a check, the stop within the grace.
    assert FENCE_AFTER - 1.5 <= seen.fence <= FENCE_AFTER + GRACE + FENCE_MARGIN, seen
    # The sidecar ends the job once vm-a is lost (its record of the last heartbeat plus lost_after):
    # never before the fence, and the task fails only then.
    assert seen.failed >= LOST_AFTER - 1.5 and seen.failed > seen.fence, seen
    assert seen.retry_start > seen.failed, seen
    assert seen.fenced_reason.startswith("fenced: no contact with the sidecar since"), seen
    # The router DB's record of the first try names the loss and the fence.
    first = stack.job("partition", 1)
    assert first is not None and first["status"] == "FAILED", first
    assert "agent vm-a lost" in first["reason"] and "fence_after_seconds=4" in first["reason"], first
