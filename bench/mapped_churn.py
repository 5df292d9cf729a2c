"""Real Airflow: long mapped instances marked failed while their one-second siblings keep ending.

    python -m bench.mapped_churn                          # 300 one-second items beside 5 long ones
    python -m bench.mapped_churn --items 40 --long 3      # what tests/test_airflow_mapped_churn.py runs

A real Airflow 3.3.2 (the harness's: LocalExecutor, parallelism 4, metadata on PostgreSQL), one real
agent and the sidecar with its default poll settings (targeted, interval 1 s, full check every 300 s).
One DAG maps ``AgenticRunOperator`` over ``--long`` long commands (map indexes 0 to long-1, started
first) and ``--items`` one-second ones. A one-second job often ends before its task instance defers,
and that task instance then stays deferred through the trigger's 8 s settle: the deferred count the
sidecar reads takes in siblings whose jobs it no longer watches, beside the long ones it does.

Once the long ones run and short ones have started ending, each long instance is marked failed
through the REST API at a random moment (0.5-2 s apart), and timed from the request until its job's
whole process group is gone. Each mark also records when the sidecar recorded its stop intent (so
detection shows apart from the agent's stop) and how many short jobs ended in the 10 s before it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.agent import AgentProcess
from harness.airflow import PASSWORD, AirflowAPI, airflow_with_sidecar
from harness.processes import alive, process_group
from harness.sidecar import AgentRef, SidecarProcess

DAG_ID = "bench_mapped_churn"
RUN_ID = "churn"
TASK_ID = "work"
LONG_COMMAND = "sleep 900 & sleep 900 & wait"
SHORT_COMMAND = "sleep 1"
GIVE_UP_SECONDS = 60.0  # a mark not stopped by then waits for the rolling full check (300 s)
DAG_FILE = '''"""bench.mapped_churn's DAG: {long} long mapped instances, then {items} one-second ones."""

from datetime import datetime, timedelta

from airflow.sdk import DAG

from agentic_airflow.operators import AgenticRunOperator

with DAG(dag_id="{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    AgenticRunOperator.partial(
        task_id="{task_id}",
        route_labels=["default"],
        poll_interval=0.5,
        stream_output=False,
        # A loaded machine's executor can fail a task before it starts: it runs again.
        retries=2,
        retry_delay=timedelta(seconds=2),
    ).expand(command={commands!r})
'''


def write_dag(folder: Path, items: int, long: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    commands = [LONG_COMMAND] * long + [SHORT_COMMAND] * items
    text = DAG_FILE.format(long=long, items=items, dag_id=DAG_ID, task_id=TASK_ID, commands=commands)
    (folder / f"{DAG_ID}.py").write_text(text)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50_s": round(statistics.median(ordered), 3),
        "max_s": round(ordered[-1], 3),
    }


def wait_gone(procs: list[psutil.Process], timeout: float = 60.0) -> float:
    started = time.monotonic()
    while alive(procs):
        if time.monotonic() - started > timeout:
            raise TimeoutError("process tree still alive")
        time.sleep(0.01)
    return time.monotonic() - started


def mark_failed(api: AirflowAPI, map_index: int) -> None:
    """What the UI's "mark failed" on one mapped instance does."""
    path = f"/dags/{DAG_ID}/dagRuns/{RUN_ID}/taskInstances/{TASK_ID}/{map_index}"
    api.http.patch(path, json={"new_state": "failed"}).raise_for_status()


def jobs_of(sidecar: SidecarProcess) -> list[dict[str, Any]]:
    with sidecar.client() as client:
        answer = client.get("/jobs", params={"dag_id": DAG_ID, "run_id": RUN_ID})
        answer.raise_for_status()
        return list(answer.json()["jobs"])


def until(predicate: Any, *, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} after {timeout:.0f} s")


def run(base: Path, *, items: int, long: int, seed: int = 1) -> dict[str, Any]:
    """The scenario on a fresh stack under ``base``; the marks' latencies and what surrounded them."""
    rng = random.Random(seed)
    write_dag(base / "dags", items, long)
    with AgentProcess(home=base / "agent", agent_id="agent-1", grace_seconds=3.0) as agent:
        sidecar = SidecarProcess(
            workdir=base / "sidecar",
            airflow_url="",  # set once Airflow's port is known
            airflow_password=PASSWORD,
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
        )
        try:
            with airflow_with_sidecar(sidecar, home=base / "airflow", dags_folder=base / "dags") as airflow:
                api = airflow.api()
                api.wait_for_dag(DAG_ID)
                api.trigger(DAG_ID, RUN_ID)
                return measure(api, agent, sidecar, items=items, long=long, rng=rng)
        finally:
            stop_left_jobs(agent)


def measure(
    api: AirflowAPI,
    agent: AgentProcess,
    sidecar: SidecarProcess,
    *,
    items: int,
    long: int,
    rng: random.Random,
) -> dict[str, Any]:
    def long_jobs() -> dict[int, dict[str, Any]] | None:
        jobs = jobs_of(sidecar)
        running = {j["map_index"]: j for j in jobs if j["map_index"] < long and j["status"] == "RUNNING"}
        return running if len(running) == long else None

    started = time.monotonic()
    try:
        jobs = until(long_jobs, timeout=300, what="the long instances' jobs not all running")
    except TimeoutError as exc:
        seen = sorted((j["map_index"], j["status"]) for j in jobs_of(sidecar))
        tis = api.http.get(f"/dags/{DAG_ID}/dagRuns/{RUN_ID}/taskInstances", params={"limit": 100}).json()
        states = sorted((t["map_index"], t["state"]) for t in tis["task_instances"])
        raise TimeoutError(f"{exc}; jobs (map index, status): {seen}; task instances: {states}") from None
    headers = {"Authorization": f"Bearer {agent.token}"}
    trees = {}
    for map_index, job in jobs.items():
        pid = httpx.get(f"{agent.url}/jobs/{job['job_id']}", headers=headers).json()["pid"]
        trees[map_index] = process_group(pid)

    def short_ended() -> list[datetime]:
        return [
            datetime.fromisoformat(j["finished_at"])
            for j in jobs_of(sidecar)
            if j["map_index"] >= long and j["finished_at"]
        ]

    until(lambda: len(short_ended()) >= 3, timeout=300, what="fewer than 3 short jobs ended")
    churn_from = time.monotonic() - started
    marks = []
    for map_index in rng.sample(sorted(trees), len(trees)):
        time.sleep(rng.uniform(0.5, 2.0))  # a random moment relative to the poll cycle
        now = datetime.now(UTC)
        recent = sum((now - end).total_seconds() <= 10 for end in short_ended())
        tree = trees[map_index]
        at, began = datetime.now(UTC), time.monotonic()  # from the request, as bench.real_airflow times
        mark_failed(api, map_index)
        try:
            wait_gone(tree, timeout=GIVE_UP_SECONDS)
            gone: float | None = round(time.monotonic() - began, 3)
        except TimeoutError:
            gone = None  # missed: it waits for the rolling full check; the next mark goes on
        marks.append(
            {
                "map_index": map_index,
                "seconds": gone,
                "stop_intent_after_s": intent_after(sidecar, jobs[map_index]["job_id"], at),
                "short_ended_10s_before": recent,
            }
        )
    final = jobs_of(sidecar)
    short = [j for j in final if j["map_index"] >= long]
    stopped_by: dict[str, int] = {}
    with sidecar.client() as client:
        for job in final:
            events = client.get(f"/jobs/{job['job_id']}/events").json()["events"]
            for event in events:
                if event["new_status"] == "STOPPING":
                    stopped_by[event["source"]] = stopped_by.get(event["source"], 0) + 1
    return {
        "sidecar": sidecar_figures(sidecar),
        "items": items,
        "long": long,
        "marked_failed_to_gone": summary([m["seconds"] for m in marks if m["seconds"] is not None]),
        f"marks_not_stopped_within_{GIVE_UP_SECONDS:.0f}_s": sum(m["seconds"] is None for m in marks),
        "marks": marks,
        "churn_started_after_s": round(churn_from, 1),
        "short_jobs_seen": len(short),
        "short_jobs_ended": sum(j["finished_at"] is not None for j in short),
        "short_jobs_not_succeeded": sorted(
            {j["status"] for j in short if j["finished_at"] and j["status"] != "SUCCEEDED"}
        ),
        "short_jobs_stopped": sum(j.get("stop_requested_at") is not None for j in short),
        "stopped_by": stopped_by,
    }


def intent_after(sidecar: SidecarProcess, job_id: str, marked: datetime) -> float | None:
    """Seconds from the mark to the stop intent the sidecar recorded (its detection, confirmation
    included), from the job's audit trail; the rest of a mark's time is the agent's stop."""
    with sidecar.client() as client:
        events = client.get(f"/jobs/{job_id}/events").json()["events"]
    at = next((e["at"] for e in events if e["new_status"] == "STOPPING"), None)
    if at is None:
        return None
    moment = datetime.fromisoformat(at)
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # the router DB's UTC
    return round((moment - marked).total_seconds(), 3)


def sidecar_figures(sidecar: SidecarProcess) -> dict[str, float]:
    """The sidecar's own account of the run (/metrics): its cycles, their mean wall time, and the
    targeted read's requests by purpose."""
    text = httpx.get(f"{sidecar.url}/metrics", timeout=30).text
    figures: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("reconciler_targeted_reads_total{"):
            purpose = name.split('"')[1]
            figures[f"requests_{purpose}"] = float(value)
        elif name.startswith("reconciler_cycles_total{") or name in (
            "reconciler_cycle_duration_seconds_sum",
            "reconciler_cycle_duration_seconds_count",
        ):
            figures[name] = float(value)
    cycles = figures.get("reconciler_cycle_duration_seconds_count", 0.0)
    if cycles:
        figures["mean_cycle_s"] = round(figures["reconciler_cycle_duration_seconds_sum"] / cycles, 3)
    return figures


def stop_left_jobs(agent: AgentProcess) -> None:
    """Jobs outlive their agent by design: stop what still runs before the agent goes."""
    headers = {"Authorization": f"Bearer {agent.token}"}
    for job_dir in (agent.home / "jobs").glob("*"):
        try:
            httpx.post(f"{agent.url}/stop/{job_dir.name}", json={"force": True}, headers=headers, timeout=30)
        except httpx.HTTPError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=300, help="one-second mapped instances")
    parser.add_argument("--long", type=int, default=5, help="long mapped instances, each marked failed")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-churn-") as base:
        print(json.dumps(run(Path(base), items=args.items, long=args.long, seed=args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
