"""Scale benchmark: the reconciler against stand-ins for Airflow and agents.

    python -m bench.scale                 # 1k, 10k and 100k active jobs, every strategy (~10 min)
    python -m bench.scale --quick         # 1k and 10k, fewer flips, naive at 1k only (< 2 min)

Each case (jobs x strategy) runs in a fresh process: the reconciler (loop, router DB on SQLite,
Airflow client, stop dispatcher) in the measured process, the stand-ins in a child process so
their CPU is not counted. Per case it reports Airflow requests and bytes per steady-state cycle,
reconciler CPU per cycle, peak RSS, detection latency (flip -> stop received at the agent) over
random single flips, and the time to stop 1,000 jobs flipped at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.naive_read import NaiveRead
from bench.standins import AgentsStandIn, AirflowStandIn, recorded_task_instance
from harness.processes import free_port
from harness.wiring import nobody_waits
from reconciler.airflow.client import AirflowClient
from reconciler.config import AgentEntry, PollConfig, StopConfig
from reconciler.core.parts import build_core
from reconciler.core.stops import StopDispatcher
from reconciler.fleet.agents import AgentPool
from reconciler.metrics import Metrics
from router_db import NewJob, RouterDB, TaskInstanceKey

AGENTS = 20
TASKS_PER_RUN = 50
INTERVAL = 1.0
OVERLAP = 2.0  # [poll] overlap_seconds (default 10): shorter here so steady state starts sooner


def layout(jobs: int) -> list[tuple[str, str, str, int]]:
    """``jobs`` task instances over DAG runs of 50 tasks, in 10 DAGs."""
    keys = []
    for i in range(jobs):
        run = i // TASKS_PER_RUN
        keys.append((f"dag_{run % 10}", f"scheduled__run_{run:06d}", f"task_{i % TASKS_PER_RUN:02d}", -1))
    return keys


# --- the stand-ins' process ----------------------------------------------------------------------


def serve_standins(jobs: int, port: int, latency: float, ready: Any) -> None:
    airflow = AirflowStandIn(recorded_task_instance(), latency=latency)
    for dag_id, run_id, task_id, map_index in layout(jobs):
        airflow.add(dag_id, run_id, task_id, map_index, "deferred", 1)
    agents = AgentsStandIn()

    async def flip(request: web.Request) -> web.Response:
        body = await request.json()
        keys = [tuple(k) for k in body["keys"]]
        return web.json_response({"at": airflow.flip(keys, body["state"])})  # type: ignore[arg-type]

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"requests": airflow.requests, "bytes": airflow.bytes_sent, "stops": agents.stops}
        )

    app = airflow.app()
    app.add_subapp("/agent-standin", agents.app())
    app.router.add_post("/control/flip", flip)
    app.router.add_get("/control/stats", stats)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def seed_router_db(path: str, jobs: int) -> None:
    db = RouterDB(f"sqlite:///{path}")
    db.import_running(
        [
            NewJob(
                TaskInstanceKey(dag_id=d, task_id=t, run_id=r, map_index=m, try_number=1),
                f"agent-{i % AGENTS}",
                "sleep 3600",
            )
            for i, (d, r, t, m) in enumerate(layout(jobs))
        ],
        source="bench",
    )
    db.dispose()


# --- one measured case ---------------------------------------------------------------------------


async def run_case(jobs: int, strategy: str, flips: int, burst: int, latency: float) -> dict[str, Any]:
    port = free_port()
    ready = multiprocessing.get_context("spawn").Event()
    standins = multiprocessing.get_context("spawn").Process(
        target=serve_standins, args=(jobs, port, latency, ready), daemon=True
    )
    standins.start()
    if not ready.wait(120):
        raise RuntimeError("stand-ins did not start")
    base = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    db = RouterDB(f"sqlite:///{workdir / 'router.db'}")
    db.create_schema()
    # Seeded in another process: building 100k rows here would count in the reconciler's peak RSS.
    seeder = multiprocessing.get_context("spawn").Process(
        target=seed_router_db, args=(db.engine.url.database, jobs)
    )
    seeder.start()
    seeder.join()
    metrics = Metrics()
    airflow = AirflowClient(base, api_version="v2", username="admin", password="x", timeout=60)
    entries = [AgentEntry(f"agent-{i}", f"{base}/agent-standin/agents/agent-{i}") for i in range(AGENTS)]
    agents = AgentPool(entries, {e.id: "t" for e in entries}, timeout=10, stop_timeout=30)
    dispatcher = StopDispatcher(db, agents, metrics, StopConfig(), changed=nobody_waits)
    poll = PollConfig(
        interval_seconds=INTERVAL,
        strategy="incremental" if strategy == "naive" else strategy,  # naive: the bench's own read
        full_resync_seconds=3600.0,  # steady state: no full resync inside the measured cycles
        overlap_seconds=OVERLAP,
    )
    naive = NaiveRead(airflow, concurrency=poll.max_concurrent_reads) if strategy == "naive" else None
    core = build_core(
        db=db, airflow=airflow, agents=agents, dispatcher=dispatcher, metrics=metrics, poll=poll, read=naive
    )
    loop = core.loop
    targeted = core.read.main.targeted if strategy == "targeted" else None  # type: ignore[attr-defined]
    control = aiohttp.ClientSession(base)
    result: dict[str, Any] = {"jobs": jobs, "strategy": strategy}
    try:
        first_started = time.perf_counter()
        await loop.cycle()  # the first cycle reads everything
        key_of = {
            j.job_id: (j.key.dag_id, j.key.run_id, j.key.task_id, j.key.map_index) for j in core.jobs.known()
        }
        job_ids = sorted(key_of)
        result["first_cycle_s"] = round(time.perf_counter() - first_started, 3)

        # Steady state: the jobs were imported moments ago; let them age out of the overlap window,
        # and let the targeted read's first round of its full check (two requests a cycle) end.
        await asyncio.sleep(OVERLAP + 0.5)
        await loop.cycle()
        while targeted is not None and not targeted.first_round_done:
            await loop.cycle()
        before = await _stats(control)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        cycles = 5 if strategy != "naive" or jobs <= 10_000 else 1
        for _ in range(cycles):
            await loop.cycle()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        after = await _stats(control)
        result |= {
            "requests_per_cycle": round((after["requests"] - before["requests"]) / cycles, 1),
            "kb_per_cycle": round((after["bytes"] - before["bytes"]) / cycles / 1024, 1),
            "cpu_ms_per_cycle": round(cpu / cycles * 1000, 1),
            "wall_ms_per_cycle": round(wall / cycles * 1000, 1),
        }
        result["requests_per_second"] = round(result["requests_per_cycle"] / max(INTERVAL, wall / cycles), 2)

        stopping = asyncio.Event()
        runner = asyncio.create_task(loop.run(stopping))
        # A new term starts the targeted read's full check over: flips come once its first round ends.
        for _ in range(3000 if strategy == "targeted" else 0):
            await asyncio.sleep(0.1)
            if targeted is None or targeted.first_round_done:
                break
        rng = random.Random(7)
        chosen = rng.sample(job_ids, flips + burst)
        latencies = []
        for job_id in chosen[:flips]:
            await asyncio.sleep(rng.uniform(0.1, 0.9))
            flipped_at = await _flip(control, [key_of[job_id]])
            arrived = await _await_stops(control, [job_id], timeout=30)
            latencies.append(arrived[job_id] - flipped_at)
        result |= _percentiles(latencies)
        if burst:
            flipped_at = await _flip(control, [key_of[j] for j in chosen[flips:]])
            arrived = await _await_stops(control, chosen[flips:], timeout=120)
            result["burst"] = burst
            result["burst_all_stopped_s"] = round(max(arrived.values()) - flipped_at, 2)
        stopping.set()
        await runner
        await dispatcher.finish(30)
    finally:
        await control.close()
        await airflow.close()
        await agents.close()
        db.dispose()
        standins.terminate()
        standins.join(10)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


async def _stats(control: aiohttp.ClientSession) -> dict[str, Any]:
    async with control.get("/control/stats") as response:
        return dict(await response.json())


async def _flip(control: aiohttp.ClientSession, keys: list[tuple[str, str, str, int]]) -> float:
    async with control.post("/control/flip", json={"keys": keys, "state": "failed"}) as response:
        return float((await response.json())["at"])


async def _await_stops(
    control: aiohttp.ClientSession, job_ids: list[str], timeout: float
) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stops = (await _stats(control))["stops"]
        if all(j in stops for j in job_ids):
            return {j: float(stops[j]) for j in job_ids}
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{sum(j in stops for j in job_ids)}/{len(job_ids)} stops arrived in {timeout} s")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "flips": len(values),
        "latency_p50_s": round(statistics.median(ordered), 3),
        "latency_p99_s": round(p99, 3),
        "latency_max_s": round(ordered[-1], 3),
    }


# --- orchestration -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1k and 10k jobs, fewer flips, naive at 1k only (< 2 min)"
    )
    parser.add_argument("--jobs", type=int, nargs="*", help="active-job counts (default 1000 10000 100000)")
    parser.add_argument("--strategies", nargs="*", default=["targeted", "incremental", "batch", "naive"])
    parser.add_argument(
        "--latency", type=float, default=0.005, help="stand-in Airflow latency per request (s)"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        jobs, strategy, flips, burst = args.case.split(",")
        print(json.dumps(asyncio.run(run_case(int(jobs), strategy, int(flips), int(burst), args.latency))))
        return 0
    counts = args.jobs or ([1000, 10000] if args.quick else [1000, 10000, 100000])
    flips = 5 if args.quick else 20
    rows = []
    for jobs in counts:
        for strategy in args.strategies:
            if strategy == "naive" and jobs > (1_000 if args.quick else 10_000):
                rows.append({"jobs": jobs, "strategy": strategy, "skipped": "one request per job per cycle"})
                continue
            burst = 1000 if jobs >= 10_000 and strategy != "naive" else 0
            case = f"{jobs},{strategy},{flips},{burst}"
            print(f"running {case} ...", file=sys.stderr, flush=True)
            output = subprocess.run(
                [sys.executable, "-m", "bench.scale", "--case", case, "--latency", str(args.latency)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
