"""Real-Airflow latency of a job's own end: the remote command exits, when is its task ``success``?

    python -m bench.real_exit                 # 20 tasks, their agent registered (exits pushed)
    python -m bench.real_exit --static        # the agent in [[agents]] (exits caught up each second)

A real Airflow 3.3.2, one real agent and the sidecar. The DAG's ``AgenticRunOperator`` tasks defer on
commands that sleep 6 to 15 s and, as their last act, write the moment they ended. For each task the
benchmark takes Airflow's ``end_date`` of the task instance minus that moment: the agent noticing the
exit, the sidecar recording it, the trigger's long-poll answering, the triggerer's event, the
scheduler and a worker running the task's completion.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from harness.agent import AgentProcess
from harness.airflow import PASSWORD, AirflowServer
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess

DAG_ID = "bench_exit"
DAGS = Path(__file__).resolve().parent / "dags"
FLEET_TOKEN = secrets.token_urlsafe(16)


def run(base: Path, tasks: int, *, static: bool) -> dict[str, object]:
    marks = base / "marks"
    marks.mkdir(parents=True)
    sidecar = SidecarProcess(
        workdir=base / "sidecar",
        airflow_url="",
        airflow_password=PASSWORD,
        agents=[],
        fleet_token=None if static else FLEET_TOKEN,
    )
    port = free_port()
    agent = AgentProcess(
        base / "agent",
        agent_id="agent-1",
        port=port,
        token=FLEET_TOKEN,
        extra_config='labels = ["default"]\n',
        extra_env={}
        if static
        else {
            "ROUTER_URL": sidecar.url,
            "SELF_URL": f"http://127.0.0.1:{port}",
            "AGENTIC_FLEET_TOKEN": FLEET_TOKEN,
        },
    )
    if static:
        sidecar.agents = [AgentRef("agent-1", agent.url, FLEET_TOKEN, labels=["default"])]
    airflow = AirflowServer(
        home=base / "airflow",
        dags_folder=DAGS,
        extra_env={
            "AIRFLOW_CONN_AGENTIC_RUN_DEFAULT": f"http://:{sidecar.token}@127.0.0.1:{sidecar.port}",
            "BENCH_EXIT_MARKS": str(marks),
            "BENCH_EXIT_TASKS": str(tasks),
        },
    )
    try:
        airflow.start()
        sidecar.airflow_url = airflow.url
        sidecar.start()
        agent.start()
        api = airflow.api()
        api.wait_for_dag(DAG_ID)
        api.trigger(DAG_ID, "bench")
        delays, recorded = [], []
        with sidecar.client() as client:
            for i in range(tasks):
                task_id = f"job_{i:02d}"
                ti = api.wait_for_state(DAG_ID, "bench", task_id, {"success", "failed"}, timeout=300)
                if ti["state"] != "success":
                    raise RuntimeError(f"{task_id} ended {ti['state']}")
                ended = float((marks / task_id).read_text())
                done = datetime.fromisoformat(ti["end_date"].replace("Z", "+00:00")).timestamp()
                delays.append(done - ended)
                listed = client.get("/jobs", params={"dag_id": DAG_ID}).json()["jobs"]
                (job_id,) = [j["job_id"] for j in listed if j["task_id"] == task_id]
                events = client.get(f"/jobs/{job_id}/events").json()["events"]
                (end,) = [e for e in events if e["new_status"] == "SUCCEEDED"]
                recorded.append(datetime.fromisoformat(end["at"].replace("Z", "+00:00")).timestamp() - ended)
        ordered = sorted(delays)
        return {
            # The sidecar's part: the exit recorded in the router DB (the trigger hears of it at once).
            "exit_to_recorded_p50_s": round(statistics.median(recorded), 2),
            "exit_to_recorded_max_s": round(max(recorded), 2),
            "agent": "[[agents]], caught up each second" if static else "registered, exits pushed",
            "tasks": tasks,
            "exit_to_success_p50_s": round(statistics.median(ordered), 2),
            "exit_to_success_p99_s": round(
                ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2
            ),
            "exit_to_success_max_s": round(ordered[-1], 2),
            "all_s": [round(d, 2) for d in delays],
        }
    finally:
        agent.stop()
        sidecar.stop()
        airflow.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--static", action="store_true", help="the agent in [[agents]], not registered")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), args.tasks, static=args.static)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
