"""Real-Airflow latency: "mark failed" to remote process gone, beside Airflow's own local kill.

    python -m bench.real_airflow                      # 50 deferred remote jobs: 20 marked failed, 10 cleared
    python -m bench.real_airflow --poll-interval 5    # the same with a slow poll: on_kill's share shows

A real Airflow 3.3.2, two real agents and the sidecar with its default poll settings. 50
``AgenticRunOperator`` tasks defer on jobs (process trees) spread over the agents; 20 of them are
marked failed through the REST API at random moments, then 10 others are cleared the same way, and
each time the benchmark measures when the job's whole process group is gone. For the anchor, ten
``BashOperator`` tasks run locally in the same Airflow and are marked failed too: Airflow itself
kills those.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from harness.agent import AgentProcess
from harness.airflow import PASSWORD, AirflowServer
from harness.processes import alive, process_group
from harness.sidecar import AgentRef, SidecarProcess

DAG_ID = "bench_latency"
DAGS = Path(__file__).resolve().parent / "dags"


def wait_gone(procs: list[psutil.Process], timeout: float = 60.0) -> float:
    started = time.monotonic()
    while alive(procs):
        if time.monotonic() - started > timeout:
            raise TimeoutError("process tree still alive")
        time.sleep(0.01)
    return time.monotonic() - started


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_s": round(statistics.median(ordered), 3),
        "p99_s": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
        "max_s": round(ordered[-1], 3),
    }


def run(base: Path, marked: int, cleared: int, seed: int, poll_interval: float) -> dict[str, object]:
    rng = random.Random(seed)
    agents = [
        AgentProcess(
            base / f"agent-{i}", agent_id=f"agent-{i}", token=secrets.token_urlsafe(16), grace_seconds=10
        )
        for i in (1, 2)
    ]
    for agent in agents:
        agent.start()
    sidecar = SidecarProcess(
        workdir=base / "sidecar",
        airflow_url="",
        airflow_password=PASSWORD,
        agents=[AgentRef(a.agent_id, a.url, a.token, labels=["default"]) for a in agents],
        interval_seconds=poll_interval,
    )
    airflow = AirflowServer(
        home=base / "airflow",
        dags_folder=DAGS,
        extra_env={
            "AIRFLOW_CONN_AGENTIC_RUN_DEFAULT": f"http://:{sidecar.token}@127.0.0.1:{sidecar.port}",
            "AIRFLOW__CORE__PARALLELISM": "14",  # 10 local tasks hold slots; remote tasks pass through
        },
    )
    try:
        airflow.start()
        sidecar.airflow_url = airflow.url
        sidecar.start()
        api = airflow.api()
        api.wait_for_dag(DAG_ID)
        api.trigger(DAG_ID, "bench")
        remote = [f"remote_{i:02d}" for i in range(50)]
        for task_id in remote:
            api.wait_for_state(DAG_ID, "bench", task_id, {"deferred"}, timeout=300)
        with sidecar.client() as client:
            jobs = {j["task_id"]: j for j in client.get("/jobs", params={"dag_id": DAG_ID}).json()["jobs"]}
        token_of = {a.agent_id: a for a in agents}
        trees = {}
        for task_id in remote:
            job = jobs[task_id]
            agent = token_of[job["agent_id"]]
            info = httpx.get(
                f"{agent.url}/jobs/{job['job_id']}", headers={"Authorization": f"Bearer {agent.token}"}
            )
            trees[task_id] = process_group(info.json()["pid"])

        latencies, clears = [], []
        chosen = rng.sample(remote, marked + cleared)
        for n, task_id in enumerate(chosen):
            time.sleep(rng.uniform(0.2, 1.5))  # random moments relative to the poll cycle
            tree = trees[task_id]
            started = time.monotonic()
            if n < marked:
                api.mark(DAG_ID, "bench", task_id, "failed")
            else:
                api.clear(DAG_ID, "bench", task_id)  # its old try's job must stop; a new try starts
            wait_gone(tree)
            (latencies if n < marked else clears).append(time.monotonic() - started)

        local = []
        for i in range(10):
            task_id = f"local_{i}"
            ti = api.wait_for_state(DAG_ID, "bench", task_id, {"running"}, timeout=120)
            tree = [
                p
                for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] == ["sleep", "900"] and ti["pid"] in {a.pid for a in p.parents()}
            ]
            if not tree:
                raise RuntimeError(f"{task_id}: local sleep process not found under pid {ti['pid']}")
            started = time.monotonic()
            api.mark(DAG_ID, "bench", task_id, "failed")
            wait_gone(tree)
            local.append(time.monotonic() - started)
        untouched = [t for t in remote if t not in chosen and alive(trees[t])]
        # Who stopped each marked job: the trigger's on_kill (the push endpoint, "api") or the poll.
        sources: dict[str, int] = {}
        with sidecar.client() as client:
            for task_id in remote:
                events = client.get(f"/jobs/{jobs[task_id]['job_id']}/events").json()["events"]
                for event in events:
                    if event["new_status"] == "STOPPING":
                        sources[event["source"]] = sources.get(event["source"], 0) + 1
        return {
            "remote_mark_failed_to_gone": summary(latencies),
            "remote_clear_to_gone": summary(clears) if clears else {},
            "remote_clear_all_s": [round(v, 3) for v in clears],
            "airflow_local_kill": summary(local),
            "airflow_local_kill_all_s": [round(v, 3) for v in local],
            "remote_all_s": [round(v, 3) for v in latencies],
            "remote_jobs_left_running": len(untouched),
            "remote_jobs_never_touched": len(remote) - len(chosen),
            "poll_interval_s": sidecar.interval_seconds,
            "stopped_by": sources,
        }
    finally:
        sidecar.stop()
        airflow.stop()
        for agent in agents:  # jobs outlive their agent by design: stop the rest before leaving
            headers = {"Authorization": f"Bearer {agent.token}"}
            for job_dir in (agent.home / "jobs").glob("*"):
                httpx.post(
                    f"{agent.url}/stop/{job_dir.name}", json={"force": True}, headers=headers, timeout=30
                )
            agent.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--marked", type=int, default=20)
    parser.add_argument("--cleared", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="the sidecar's [poll] interval")
    parser.add_argument("--workdir", help="keep Airflow's, the agents' and the sidecar's files here")
    args = parser.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=False)
        print(
            json.dumps(
                run(Path(args.workdir), args.marked, args.cleared, args.seed, args.poll_interval), indent=1
            )
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-real-") as base:
        print(json.dumps(run(Path(base), args.marked, args.cleared, args.seed, args.poll_interval), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
