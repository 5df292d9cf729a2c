"""The demo: a real Airflow 3, one agent and the sidecar on loopback.

A DAG run starts two remote jobs; one task is marked failed through the REST API exactly as the UI
does, and the demo prints when each step of its stop happened. Everything it started is stopped.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.agent import AgentProcess
from harness.airflow import PASSWORD, REPO_ROOT, AirflowServer
from harness.processes import alive, process_group
from harness.sidecar import AgentRef, SidecarProcess

DAG_ID = "agentic_example"


def say(text: str) -> None:
    print(text, flush=True)


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


def run(base: Path) -> None:
    say(f"working directory: {base}")
    with AgentProcess(
        home=base / "agent", agent_id="agent-1", token=secrets.token_urlsafe(24), grace_seconds=5.0
    ) as agent:
        say(f"[1/5] agent-1 up at {agent.url}")
        sidecar = SidecarProcess(
            workdir=base / "sidecar",
            airflow_url="",
            airflow_password=PASSWORD,
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
        )
        airflow = AirflowServer(
            home=base / "airflow",
            dags_folder=REPO_ROOT / "examples" / "dags",
            # Stored encrypted in Airflow's metadata DB, as production keeps it.
            connections={"agentic_run_default": f"http://:{sidecar.token}@127.0.0.1:{sidecar.port}"},
        )
        try:
            say("[2/5] starting Airflow 3 (api-server, scheduler, dag-processor, triggerer) on 127.0.0.1")
            airflow.start()
            sidecar.airflow_url = airflow.url
            sidecar.start()
            poll = sidecar.interval_seconds
            say(f"      Airflow at {airflow.url}, sidecar at {sidecar.url} (poll every {poll} s)")
            demo(airflow, agent, sidecar)
        finally:
            say("cleaning up: stopping the sidecar, Airflow and the agent")
            sidecar.stop()
            airflow.stop()


def demo(airflow: AirflowServer, agent: AgentProcess, sidecar: SidecarProcess) -> None:
    api = airflow.api()
    run_id = f"demo__{datetime.now(UTC):%Y%m%dT%H%M%S}"
    api.wait_for_dag(DAG_ID)
    api.trigger(DAG_ID, run_id)
    say(f"[3/5] triggered {DAG_ID} run {run_id}; waiting for both tasks to defer on their remote jobs")
    with (
        sidecar.client() as client,
        httpx.Client(base_url=agent.url, headers={"Authorization": f"Bearer {agent.token}"}) as agent_http,
    ):
        trees: dict[str, tuple[str, list[psutil.Process]]] = {}
        for task_id in ("long_job", "sibling_job"):
            api.wait_for_state(DAG_ID, run_id, task_id, {"deferred"})
            jobs = {
                j["task_id"]: j
                for j in client.get("/jobs", params={"dag_id": DAG_ID, "run_id": run_id}).json()["jobs"]
            }
            job_id = jobs[task_id]["job_id"]
            pid = agent_http.get(f"/jobs/{job_id}").json()["pid"]
            wait(lambda pid=pid: len(process_group(pid)) >= 3, 10, "job processes did not start")
            trees[task_id] = (job_id, process_group(pid))
            say(
                f"      {task_id:<12} deferred; job {job_id} RUNNING on agent-1, process group {pid} "
                f"({len(trees[task_id][1])} processes)"
            )

        job_id, tree = trees["long_job"]
        say("[4/5] marking long_job failed through the REST API, as the UI does")
        marked = datetime.now(UTC)
        api.mark(DAG_ID, run_id, "long_job", "failed")
        wait(lambda: not alive(tree), 30, "process tree still alive")
        gone = datetime.now(UTC)
        wait(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "FAILED", 30, "job not FAILED")
        job = client.get(f"/jobs/{job_id}").json()
        events = client.get(f"/jobs/{job_id}/events").json()["events"]
        stop_intent = next(e for e in events if e["new_status"] == "STOPPING")
        final = next(e for e in events if e["new_status"] == "FAILED")

        def seconds(at: datetime | str) -> float:
            moment = datetime.fromisoformat(at) if isinstance(at, str) else at
            return (moment - marked).total_seconds()

        outcome = f"{job['status']} (rc={job['rc']}, reason: {job['reason']})"
        timeline = [
            (0.0, "long_job marked failed in Airflow"),
            (
                seconds(stop_intent["at"]),
                "reconciler saw the divergence, confirmed it by a direct read, recorded the stop intent "
                "(STOPPING) and sent the stop to agent-1",
            ),
            (seconds(gone), f"remote process group gone ({len(tree)} processes, none left)"),
            (seconds(final["at"]), f"router DB: {outcome}"),
        ]
        say("")
        for at, what in sorted(timeline):
            say(f"      T+{at:6.3f} s   {what}")
        say("")
        sibling_id, sibling_tree = trees["sibling_job"]
        sibling = client.get(f"/jobs/{sibling_id}").json()
        state = api.task_instance(DAG_ID, run_id, "sibling_job")["state"]
        say(
            f"[5/5] sibling_job untouched: task {state}, job {sibling['status']}, "
            f"{len(alive(sibling_tree))}/{len(sibling_tree)} processes alive"
        )
        say("      marking sibling_job success: the sidecar stops its job too")
        api.mark(DAG_ID, run_id, "sibling_job", "success")
        wait(lambda: not alive(sibling_tree), 30, "sibling tree still alive")
        wait(
            lambda: client.get(f"/jobs/{sibling_id}").json()["status"] == "SUCCEEDED",
            30,
            "sibling not SUCCEEDED",
        )
        say("      sibling_job's job stopped; router DB: SUCCEEDED")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, router DB)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="agentic-demo-"))
    try:
        run(base)
    except (TimeoutError, RuntimeError) as exc:
        say(f"demo failed: {exc} (logs under {base})")
        return 1
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
