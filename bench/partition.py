"""A partitioned agent against a real Airflow 3.3.2: its at_most_once job and the retry never overlap.

    python -m bench.partition               # 3 partitions on one stack
    python -m bench.partition --runs 5

Two registered agents share the label ``partition``. Everything between vm-a and the sidecar goes
through TCP proxies on 127.0.0.1 (its heartbeats, and the sidecar's calls to it), which the bench
cuts as a partition does: bytes go nowhere, connections hang. The DAG (tests/dags/agentic_partition.py)
runs one ``at_most_once`` task with ``retries=1``; each run's first try is placed on vm-a (vm-b
drained meanwhile), then both proxies are cut. vm-a fences the job; the sidecar declares vm-a lost
and ends the job FAILED, no sooner than the fence has surely fired; Airflow retries the task, which
goes to vm-b. Measured from the cut (wall clock): the old copy's process group gone (read from /proc
every 10 ms), the first try leaving ``deferred``, the retry's job process started (its start time in
/proc), and the overlap between the two copies. The proxies are then healed, and vm-a reports the
reason it stopped the job. tests/test_airflow_partition.py runs one partition of the same stack.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.agent import AgentProcess
from harness.airflow import PASSWORD, AirflowAPI, AirflowServer, airflow_with_sidecar
from harness.processes import alive, free_port, process_group, wait_until
from harness.sidecar import SidecarProcess
from harness.tcp_proxy import TcpProxy

DAGS = Path(__file__).resolve().parent.parent / "tests" / "dags"
DAG_ID, TASK_ID = "partition_fence", "write"
FLEET_TOKEN = "partition-fleet-token"
TREE_SIZE = 4  # the shell, its sub-shell, two sleeps (tests/dags/agentic_partition.py)

HEARTBEAT = 1.0  # [agent] heartbeat_seconds
FENCE_AFTER = 4.0  # [agent] fence_after_seconds: above two heartbeats
GRACE = 1.0  # [agent] grace_seconds
# [fleet] lost_after_seconds above fence_after + one fence check (0.4 s) + grace + one heartbeat (6.4 s)
LOST_AFTER = 8.0
FLEET_CONFIG = (
    f"[leader]\nlease_seconds = {LOST_AFTER - 1}\n"
    "[fleet]\n"
    f"lost_after_seconds = {LOST_AFTER}\n"
    "check_interval_seconds = 0.5\n"
    "check_timeout_seconds = 2.0\n"
    "orphan_sweep_seconds = 5.0\n"
)
AGENT_CONFIG = (
    f'heartbeat_seconds = {HEARTBEAT}\nfence_after_seconds = {FENCE_AFTER}\nlabels = ["partition"]\n'
)


@dataclass
class Stack:
    airflow: AirflowServer
    api: AirflowAPI
    sidecar: SidecarProcess
    agents: dict[str, AgentProcess]
    cut_off: tuple[TcpProxy, TcpProxy]  # vm-a's heartbeats to the sidecar, the sidecar's calls to vm-a

    def jobs(self, run_id: str) -> list[dict[str, Any]]:
        with self.sidecar.client() as client:
            answer = client.get("/jobs", params={"dag_id": DAG_ID, "run_id": run_id})
            answer.raise_for_status()
            return list(answer.json()["jobs"])

    def job(self, run_id: str, try_number: int) -> dict[str, Any] | None:
        found = [job for job in self.jobs(run_id) if job["try_number"] == try_number]
        return found[0] if found else None

    def on_agent(self, agent_id: str, job_id: str) -> dict[str, Any]:
        """The job as its agent has it (asked directly, as the sidecar would, never through a proxy)."""
        agent = self.agents[agent_id]
        answer = httpx.get(
            f"http://127.0.0.1:{agent.port}/jobs/{job_id}",
            headers={"Authorization": f"Bearer {agent.call_token()}"},
            timeout=10,
        )
        answer.raise_for_status()
        return dict(answer.json())

    def drain(self, agent_id: str, draining: bool) -> None:
        with self.sidecar.client() as client:
            verb = "drain" if draining else "undrain"
            client.post(f"/agents/{agent_id}/{verb}").raise_for_status()

    def agent_state(self, agent_id: str) -> str | None:
        with self.sidecar.client() as client:
            agents = {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}
        state = agents.get(agent_id, {}).get("state")
        return str(state) if state is not None else None


def registering(home: Path, agent_id: str, *, port: int, router_url: str, self_url: str) -> AgentProcess:
    return AgentProcess(
        home,
        agent_id=agent_id,
        port=port,
        token=FLEET_TOKEN,
        accepted_tokens=[],
        grace_seconds=GRACE,
        extra_config=AGENT_CONFIG,
        extra_env={
            "ROUTER_URL": router_url,
            "SELF_URL": self_url,
            "AGENTIC_FLEET_TOKEN": FLEET_TOKEN,
            "AGENTIC_AGENT_TOKEN": "",
        },
    )


@contextmanager
def partition_stack(base: Path) -> Iterator[Stack]:
    """Airflow 3.3.2, the sidecar, vm-a behind the proxies and vm-b beside them, all registered."""
    with ExitStack() as cleanup:
        sidecar = SidecarProcess(
            workdir=base / "sidecar",
            airflow_url="",  # set once Airflow's port is known
            airflow_password=PASSWORD,
            agents=[],
            interval_seconds=1.0,
            api_version="v2",
            fleet_token=FLEET_TOKEN,
            extra_config=FLEET_CONFIG,
        )
        airflow = cleanup.enter_context(
            airflow_with_sidecar(sidecar, home=base / "airflow", dags_folder=DAGS)
        )
        a_port = free_port()
        to_sidecar = cleanup.enter_context(TcpProxy(sidecar.port))
        to_a = cleanup.enter_context(TcpProxy(a_port))
        a = registering(base / "vm-a", "vm-a", port=a_port, router_url=to_sidecar.url, self_url=to_a.url)
        b_port = free_port()
        b = registering(
            base / "vm-b", "vm-b", port=b_port, router_url=sidecar.url, self_url=f"http://127.0.0.1:{b_port}"
        )
        agents = {"vm-a": cleanup.enter_context(a), "vm-b": cleanup.enter_context(b)}
        api = airflow.api()
        api.wait_for_dag(DAG_ID)
        stack = Stack(airflow, api, sidecar, agents, (to_sidecar, to_a))
        wait_until(lambda: all(stack.agent_state(a) == "live" for a in agents), timeout=30, what="both live")
        yield stack


@dataclass
class Partition:
    """Seconds from the cut; ``overlap``: how long both copies ran at once (0: never)."""

    run_id: str
    fence: float  # the first try's process group gone (the first /proc read that found none of it)
    failed: float  # the first try left deferred in Airflow
    retry_start: float  # the retry's job process started (/proc)
    overlap: float
    retry_agent: str
    fenced_reason: str  # what vm-a recorded in the job, read once the partition healed


class Watch(threading.Thread):
    """Reads /proc every 10 ms until ``procs`` are all gone: when it first found none alive."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.gone_at: float | None = None
        self.stop_at = time.monotonic() + 120

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            if not alive(self.procs):
                self.gone_at = time.time()
                return
            time.sleep(0.01)


def first_try_on_a(stack: Stack, run_id: str) -> tuple[dict[str, Any], list[psutil.Process]]:
    """Trigger ``run_id`` with vm-b drained: the first try runs on vm-a; its whole process group."""
    stack.drain("vm-b", True)
    try:
        stack.api.trigger(DAG_ID, run_id)
        stack.api.wait_for_state(DAG_ID, run_id, TASK_ID, {"deferred"}, timeout=120)
        job = stack.job(run_id, 1)
        assert job is not None and (job["agent_id"], job["status"]) == ("vm-a", "RUNNING"), job
    finally:
        stack.drain("vm-b", False)
    pgid = int(stack.on_agent("vm-a", job["job_id"])["pid"])
    wait_until(lambda: len(process_group(pgid)) >= TREE_SIZE, timeout=10, what="the first try's tree")
    return job, process_group(pgid)


def partition_once(stack: Stack, run_id: str) -> Partition:
    job, tree = first_try_on_a(stack, run_id)
    watch = Watch(tree)
    cut_at = time.time()
    for proxy in stack.cut_off:
        proxy.cut()
    watch.start()
    failed_at: float | None = None
    retry: dict[str, Any] | None = None
    retry_started: float | None = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (failed_at is None or retry_started is None):
            if failed_at is None and stack.api.task_instance(DAG_ID, run_id, TASK_ID)["try_number"] > 1:
                failed_at = time.time()  # the second try is under way: the first one failed
            elif (
                failed_at is None and stack.api.task_instance(DAG_ID, run_id, TASK_ID)["state"] != "deferred"
            ):
                failed_at = time.time()
            if retry_started is None:  # read again until it runs (QUEUED first)
                retry = stack.job(run_id, 2)
            if (
                retry is not None
                and retry_started is None
                and retry["status"] in ("RUNNING", "SUCCEEDED", "FAILED")
            ):
                pid = int(stack.on_agent(retry["agent_id"], retry["job_id"])["pid"])
                retry_started = psutil.Process(pid).create_time()
            time.sleep(0.05)
        watch.join(timeout=30)
        assert watch.gone_at is not None, "the first try's processes outlived the watch"
        assert failed_at is not None and retry is not None and retry_started is not None, (failed_at, retry)
    finally:
        for proxy in stack.cut_off:
            proxy.heal()
    # Healed: vm-a is heard again, and its record of the job says why it stopped it.
    wait_until(lambda: stack.agent_state("vm-a") == "live", timeout=30, what="vm-a live again")
    reason = str(stack.on_agent("vm-a", job["job_id"]).get("reason") or "")
    stack.api.mark(DAG_ID, run_id, TASK_ID, "success")  # the retry is stopped: the run is over
    return Partition(
        run_id=run_id,
        fence=watch.gone_at - cut_at,
        failed=failed_at - cut_at,
        retry_start=retry_started - cut_at,
        overlap=max(0.0, watch.gone_at - retry_started),
        retry_agent=str(retry["agent_id"]),
        fenced_reason=reason,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    started = datetime.now(UTC)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-partition-") as tmp, partition_stack(Path(tmp)) as stack:
        for index in range(args.runs):
            rows.append(partition_once(stack, f"partition-{index + 1}"))
            print(rows[-1], flush=True)
    machine = f"{platform.node()}, {psutil.cpu_count()} cores"
    print(f"\n{started:%Y-%m-%d}, {machine}, Airflow {stack.airflow.version}")
    print(
        f"fence_after_seconds {FENCE_AFTER:g}, grace_seconds {GRACE:g}, heartbeat_seconds {HEARTBEAT:g}, "
        f"lost_after_seconds {LOST_AFTER:g}; seconds from the cut:\n"
    )
    print("| run | fence (old copy gone) | first try failed | retry started | overlap | retry on |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row.run_id} | {row.fence:.2f} | {row.failed:.2f} | {row.retry_start:.2f} | "
            f"{row.overlap:.2f} | {row.retry_agent} |"
        )


if __name__ == "__main__":
    main()
