"""Soak: many short jobs through one real agent and the real sidecar, with retention set to seconds.

    python -m bench.soak            # 20,000 jobs at 40 a second, retention 60 s (about 10 minutes)
    python -m bench.soak --quick    # 3,000 jobs, retention 10 s (about 2 minutes)

Airflow is the REST stand-in (every submitted task instance is ``running``, so the loop reads and
keeps them all); the sidecar polls it every second, as by default. A few long jobs run from the start
to the end: older than every retention period, they must never be removed. Every window the run
prints the agent's disk use (its job directories' blocks), the jobs it keeps, the router DB's rows
and file size, the active jobs and the sidecar's mean cycle time; at the end, whether disk and router
DB stayed flat after the first retention period and the cycle time did not grow.
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.agent import AgentProcess
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

LONG_JOBS = 3
SUBMITTERS = 4
WINDOW_SECONDS = 10.0


@dataclass
class Sample:
    at: float
    submitted: int
    disk_bytes: int
    retained: int
    db_jobs: int
    db_events: int
    db_file_bytes: int
    active: int
    cycle_ms: float


def disk_bytes(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def db_rows(path: Path) -> tuple[int, int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
        events = conn.execute("SELECT count(*) FROM job_events").fetchone()[0]
        return int(jobs), int(events)


def cycle_totals(sidecar: SidecarProcess) -> tuple[float, float]:
    text = httpx.get(f"{sidecar.url}/metrics", timeout=10).text
    total = re.search(r"^reconciler_cycle_duration_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^reconciler_cycle_duration_seconds_count (\S+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3,000 jobs, retention 10 s")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=40.0, help="submissions a second")
    parser.add_argument("--keep-seconds", type=float, default=60.0, help="both services' retention")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.keep_seconds = 3_000, 10.0
    base = Path(tempfile.mkdtemp(prefix="agentic-soak-"))
    airflow = ServedAirflow()
    airflow.start()
    agent_config = (
        f"retain_finished_seconds = {args.keep_seconds}\nretention_check_seconds = {args.keep_seconds / 4}\n"
    )
    samples: list[Sample] = []
    try:
        with AgentProcess(base / "agent", agent_id="agent-1", extra_config=agent_config) as agent:
            sidecar = SidecarProcess(
                workdir=base / "sidecar",
                airflow_url=airflow.url,
                airflow_password="unused",
                api_version="v2",
                agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
                extra_config=(
                    f"[retention]\nkeep_days = {args.keep_seconds / 86400}\n"
                    f"check_seconds = {args.keep_seconds / 4}\n"
                ),
            )
            with sidecar, sidecar.client() as client:
                samples = soak(args, airflow, agent, sidecar, client, base)
    finally:
        airflow.stop()
    return report(args, samples)


def soak(
    args: argparse.Namespace,
    airflow: ServedAirflow,
    agent: AgentProcess,
    sidecar: SidecarProcess,
    client: httpx.Client,
    base: Path,
) -> list[Sample]:
    def submit(task: str, command: str) -> str:
        airflow.call_soon(airflow.standin.add, "soak", "r", task, -1, "running", 1)
        body = {"command": command, "labels": ["default"], "dag_id": "soak", "task_id": task,
                "run_id": "r", "map_index": -1, "try_number": 1}  # fmt: skip
        for _ in range(50):
            answer = client.post("/jobs", json=body)
            if answer.status_code in (200, 201):
                return str(answer.json()["job_id"])
            time.sleep(0.1)
        raise RuntimeError(f"submission refused: {answer.status_code} {answer.text[:200]}")

    long_ids = [submit(f"long-{i}", "sleep 86400") for i in range(LONG_JOBS)]
    db_file = base / "sidecar" / "router.db"
    samples: list[Sample] = []
    started = time.monotonic()
    last = cycle_totals(sidecar)
    next_window = started + WINDOW_SECONDS

    def sample(submitted: int) -> None:
        nonlocal last, next_window
        now = cycle_totals(sidecar)
        cycles = now[1] - last[1]
        cycle_ms = 1000 * (now[0] - last[0]) / cycles if cycles else 0.0
        last = now
        jobs, events = db_rows(db_file)
        health = httpx.get(f"{agent.url}/healthz", timeout=10).json()
        active = len(client.get("/jobs", params={"status": "RUNNING", "limit": 10000}).json()["jobs"])
        disk = disk_bytes(base / "agent" / "jobs")
        at = time.monotonic() - started
        samples.append(
            Sample(
                at,
                submitted,
                disk,
                health["jobs_retained"],
                jobs,
                events,
                db_file.stat().st_size,
                active,
                cycle_ms,
            )
        )
        s = samples[-1]
        print(
            f"t={s.at:6.0f}s submitted={s.submitted:6d} agent disk={s.disk_bytes / 1e6:7.2f} MB "
            f"kept={s.retained:6d}  router DB jobs={s.db_jobs:6d} events={s.db_events:6d} "
            f"file={s.db_file_bytes / 1e6:6.2f} MB  active={s.active:4d}  cycle={s.cycle_ms:6.1f} ms",
            flush=True,
        )
        next_window += WINDOW_SECONDS

    # A submission waits for the agent to start the job (tens of ms): a few in flight keep the rate.
    with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
        pending: list[Future[str]] = []
        for n in range(args.jobs):
            due = started + n / args.rate
            if (pause := due - time.monotonic()) > 0:
                time.sleep(pause)
            pending.append(pool.submit(submit, f"t{n}", "true"))
            if time.monotonic() >= next_window:
                sample(n + 1)
            if len(pending) >= 4 * SUBMITTERS:  # bounded backlog; an error surfaces here
                for done in pending[: 2 * SUBMITTERS]:
                    done.result()
                del pending[: 2 * SUBMITTERS]
        for done in pending:
            done.result()
    # Two retention periods more: what was submitted last ends and goes too.
    until = time.monotonic() + 2 * args.keep_seconds + WINDOW_SECONDS
    while time.monotonic() < until:
        time.sleep(max(0.0, next_window - time.monotonic()))
        sample(args.jobs)
    for job_id in long_ids:  # older than every retention period, still running: never removed
        assert client.get(f"/jobs/{job_id}").json()["status"] == "RUNNING", job_id
        assert (base / "agent" / "jobs" / job_id).is_dir(), job_id
    return samples


def report(args: argparse.Namespace, samples: list[Sample]) -> int:
    # While jobs still come, once the first retention periods are over: flat from there on.
    settled = [
        s for s in samples if s.at >= 2 * args.keep_seconds + WINDOW_SECONDS and s.submitted < args.jobs
    ]
    if len(settled) < 3:
        print("too short a run to judge")
        return 1
    first, rest = settled[: len(settled) // 2], settled[len(settled) // 2 :]

    def grows(attr: str) -> float:
        early, late = (
            statistics.mean(getattr(s, attr) for s in first),
            statistics.mean(getattr(s, attr) for s in rest),
        )
        return late / early if early else 1.0

    print(
        f"\nafter {samples[-1].submitted} jobs, {args.keep_seconds:g} s retention; later half / earlier "
        f"half of the settled windows: agent disk x{grows('disk_bytes'):.2f}, "
        f"router DB jobs x{grows('db_jobs'):.2f}, "
        f"events x{grows('db_events'):.2f}, cycle time x{grows('cycle_ms'):.2f}; "
        f"{LONG_JOBS} long jobs kept running and on disk"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
