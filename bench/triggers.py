"""Deferred tasks at scale: the operator's real trigger code against a real sidecar process.

    python -m bench.triggers                      # 1,000, 2,000 and 10,000 deferred tasks (~5 min)
    python -m bench.triggers --tasks 1000 --window 20
    python -m bench.triggers --push               # the agents register and push exits in heartbeats

Per case: a real sidecar (``python -m reconciler run``, SQLite router DB, 1 s cycle) routing to 20
stand-in agents that speak the change feed (``GET /jobs?changed_since=``), with Airflow's stand-in
saying every task is deferred; the router DB holds one RUNNING job per task. The triggers are
:class:`agentic_airflow.polling.JobPoller`, what ``AgenticJobTrigger.run`` runs, many to an event loop
as Airflow's triggerer runs them, in worker processes of 2,500 each (several triggerers), each with
its own HTTP client and connection; only the TLS context is one per process (one per trigger, 10,000
would not fit in memory). ``stream_output=False`` by default (``--stream-output`` reads
the output after each poll, which goes to the agents).

Measured over a steady window: the sidecar's CPU (its process only), the answer time of plain
``GET /jobs/{id}`` reads sent beside the triggers' long-polls, the requests each agent gets a second,
and, for jobs made to exit at random moments, the time from the exit on the agent to the trigger's
event. Everything on 127.0.0.1; each case stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import queue
import random
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
from aiohttp import web

from agentic_airflow.polling import JobPoller
from agentic_airflow.sidecar_client import SidecarEndpoint
from bench.standins import AirflowStandIn, recorded_task_instance
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess
from router_db import NewJob, RouterDB, TaskInstanceKey

AGENTS = 20
FLEET_TOKEN = "bench-fleet-token"
TRIGGERS_PER_PROCESS = 2500
TASKS_PER_RUN = 50


def layout(tasks: int) -> list[tuple[str, str, str, int]]:
    return [
        (f"dag_{(i // TASKS_PER_RUN) % 10}", f"run_{i // TASKS_PER_RUN:06d}", f"task_{i % 50:02d}", -1)
        for i in range(tasks)
    ]


# --- the stand-ins' process: Airflow and the agents ------------------------------------------------------


class AgentsWithFeed:
    """Any number of agents under ``/agents/{agent}``: every job RUNNING until ``/control/exit``; the
    change feed lists exits since the cursor (in full: every exit, a RUNNING job not listed is kept).
    Counts every request per agent."""

    def __init__(self) -> None:
        self.epoch = f"e{random.randrange(1 << 30)}"
        self.changes: dict[str, list[dict[str, Any]]] = {}  # agent -> exits in order
        self.exited: dict[str, dict[str, Any]] = {}
        self.exit_times: dict[str, float] = {}
        self.requests: Counter[str] = Counter()

    def _job(self, job_id: str) -> dict[str, Any]:
        return self.exited.get(job_id) or {
            "job_id": job_id, "status": "RUNNING", "pid": 1, "rc": None,
            "started_at": None, "finished_at": None, "reason": None,
        }  # fmt: skip

    async def health(self, request: web.Request) -> web.Response:
        agent = request.match_info["agent"]
        self.requests[agent] += 1
        return web.json_response({"status": "ok", "agent_id": agent, "jobs_running": 0, "max_jobs": 0})

    async def jobs(self, request: web.Request) -> web.Response:
        agent = request.match_info["agent"]
        self.requests[agent] += 1
        if "changed_since" not in request.query:
            return web.json_response({"jobs": []})  # the orphan sweep: nothing runs untracked
        log = self.changes.setdefault(agent, [])
        epoch, _, seen = request.query["changed_since"].partition("-")
        full = epoch != self.epoch or not seen.isdigit()
        shown = log if full else log[int(seen) :]
        return web.json_response({"jobs": shown, "cursor": f"{self.epoch}-{len(log)}", "full": full})

    async def job(self, request: web.Request) -> web.Response:
        self.requests[request.match_info["agent"]] += 1
        return web.json_response(self._job(request.match_info["job_id"]))

    async def log(self, request: web.Request) -> web.Response:
        self.requests[request.match_info["agent"]] += 1
        offset = request.query.get("offset", "0")
        return web.Response(body=b"", headers={"X-Log-Size": "0", "X-Next-Offset": offset})

    async def stop(self, request: web.Request) -> web.Response:
        self.requests[request.match_info["agent"]] += 1
        return web.json_response(
            {"ok": True, "message": "stopped", "status": "FAILED", "rc": -15, "action": "terminated",
             "signal": "SIGTERM", "reason": "stand-in"}
        )  # fmt: skip

    def exit(self, agent: str, job_id: str) -> float:
        now = time.time()
        stamp = datetime.fromtimestamp(now, UTC).isoformat()
        info = {
            **self._job(job_id),
            "status": "SUCCEEDED",
            "rc": 0,
            "finished_at": stamp,
            "started_at": stamp,
        }
        self.exited[job_id] = info
        self.changes.setdefault(agent, []).append(info)
        self.exit_times[job_id] = now
        return now

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/agents/{agent}/health", self.health)
        app.router.add_get("/agents/{agent}/jobs", self.jobs)
        app.router.add_get("/agents/{agent}/jobs/{job_id}", self.job)
        app.router.add_get("/agents/{agent}/jobs/{job_id}/log", self.log)
        app.router.add_post("/agents/{agent}/stop/{job_id}", self.stop)
        return app


def serve_standins(tasks: int, port: int, ready: Any) -> None:
    airflow = AirflowStandIn(recorded_task_instance())
    for dag_id, run_id, task_id, map_index in layout(tasks):
        airflow.add(dag_id, run_id, task_id, map_index, "deferred", 1)
    agents = AgentsWithFeed()

    pushing: dict[str, Any] = {}  # --push: the sidecar, its fleet token, a client session
    background: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    async def exit_job(request: web.Request) -> web.Response:
        body = await request.json()
        at = agents.exit(body["agent"], body["job_id"])
        if pushing:  # a registered agent tells the sidecar in a heartbeat, as the job ends
            change = agents.exited[body["job_id"]]
            spawn(heartbeat(body["agent"], [change]))
        return web.json_response({"at": at})

    async def heartbeat(agent: str, jobs: list[dict[str, Any]]) -> None:
        log = agents.changes.get(agent, [])
        beat = {
            "url": f"{pushing['base']}/agent-standin/agents/{agent}",
            "instance": pushing["instance"],
            "heartbeat_seconds": 10.0,
            "jobs": jobs,
            "cursor": f"{agents.epoch}-{len(log)}",
        }
        headers = {"Authorization": f"Bearer {pushing['token']}"}
        async with pushing["session"].put(
            f"{pushing['sidecar']}/agents/{agent}", json=beat, headers=headers
        ) as r:
            if r.status != 200:
                print("heartbeat refused:", r.status, await r.text(), file=sys.stderr)

    async def register(request: web.Request) -> web.Response:
        """--push: the 20 agents register, then heartbeat every 10 s; exits go out at once."""
        body = await request.json()
        pushing.update(body, instance=f"i{random.randrange(1 << 30)}", session=aiohttp.ClientSession())
        for i in range(AGENTS):
            await heartbeat(f"agent-{i}", [])

        async def beat_forever(agent: str) -> None:
            while True:
                await asyncio.sleep(10.0)
                await heartbeat(agent, [])

        for i in range(AGENTS):
            spawn(beat_forever(f"agent-{i}"))
        return web.json_response({"registered": AGENTS})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": dict(agents.requests), "airflow": airflow.requests})

    app = airflow.app()
    app.add_subapp("/agent-standin", agents.app())
    app.router.add_post("/control/exit", exit_job)
    app.router.add_post("/control/register", register)
    app.router.add_get("/control/stats", stats)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the triggers' processes ------------------------------------------------------------------------------


class _Poller(JobPoller):
    """The trigger's poller; its client verifies TLS with the process's one context (see the module's
    docstring), and has a connection pool of its own, as each trigger's client in a triggerer does."""

    tls: ssl.SSLContext

    async def _client(self, endpoint: SidecarEndpoint) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=endpoint.base_url,
            headers=endpoint.headers,
            timeout=self._request_timeout,
            verify=self.tls,
        )


class _Quiet:
    def info(self, msg: str, *args: Any) -> None:
        pass

    def warning(self, msg: str, *args: Any) -> None:
        print("trigger warning:", msg % args, file=sys.stderr)

    def error(self, msg: str, *args: Any) -> None:
        print("trigger error:", msg % args, file=sys.stderr)


def run_triggers(
    job_ids: list[str], url: str, token: str, poll_interval: float, stream: bool, events: Any, ready: Any
) -> None:
    async def main() -> None:
        _Poller.tls = ssl.create_default_context()
        endpoint = SidecarEndpoint(url, token)

        async def resolve(conn_id: str) -> SidecarEndpoint:
            return endpoint

        async def one(job_id: str) -> None:
            poller = _Poller(
                job_id=job_id,
                conn_id="agentic_run_default",
                resolve=resolve,
                log=_Quiet(),
                poll_interval=poll_interval,
                log_offset=0 if stream else None,
            )
            event = await poller.run()
            events.put((job_id, time.time(), event.get("status")))

        tasks = []
        for i, job_id in enumerate(job_ids):
            tasks.append(asyncio.create_task(one(job_id)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # a triggerer picks triggers up in batches, not all at once
        ready.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


# --- one case ---------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_case(
    tasks: int, *, window: float, exits: int, poll_interval: float, stream: bool, push: bool = False
) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    port = free_port()
    ready = spawn.Event()
    standins = spawn.Process(target=serve_standins, args=(tasks, port, ready), daemon=True)
    standins.start()
    if not ready.wait(120):
        raise RuntimeError("stand-ins did not start")
    base = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-triggers-"))
    db_url = f"sqlite:///{workdir / 'router.db'}"
    db = RouterDB(db_url)
    db.create_schema()
    keys = layout(tasks)
    ids = db.import_running(
        [
            NewJob(
                TaskInstanceKey(dag_id=d, task_id=t, run_id=r, map_index=m),
                f"agent-{i % AGENTS}",
                "sleep 3600",
            )
            for i, (d, r, t, m) in enumerate(keys)
        ],
        source="bench",
    )
    db.dispose()
    agent_of = {job_id: f"agent-{i % AGENTS}" for i, job_id in enumerate(ids)}
    sidecar = SidecarProcess(
        workdir=workdir / "sidecar",
        airflow_url=base,
        airflow_password="stand-in",
        # --push: the agents register themselves (the fleet token) and push exits in heartbeats.
        agents=[]
        if push
        else [AgentRef(f"agent-{i}", f"{base}/agent-standin/agents/agent-{i}", "t") for i in range(AGENTS)],
        api_version="v2",
        db_url=db_url,
        interval_seconds=1.0,
        fleet_token=FLEET_TOKEN if push else None,
    )
    events: Any = spawn.Queue()
    workers: list[Any] = []
    result: dict[str, Any] = {
        "tasks": tasks,
        "poll_interval": poll_interval,
        "stream_output": stream,
        "agents": "registered, pushing exits" if push else "[[agents]], caught up each cycle",
    }
    try:
        sidecar.start()
        assert sidecar.proc is not None
        if push:
            register = {"sidecar": sidecar.url, "token": FLEET_TOKEN, "base": base}
            httpx.post(f"{base}/control/register", json=register, timeout=60).raise_for_status()
            with sidecar.client() as client:
                deadline = time.monotonic() + 30
                while len(client.get("/agents").json()["agents"]) < AGENTS:
                    assert time.monotonic() < deadline, "the agents did not register"
                    time.sleep(0.2)
        proc = psutil.Process(sidecar.proc.pid)
        for start in range(0, tasks, TRIGGERS_PER_PROCESS):
            started = spawn.Event()
            worker = spawn.Process(
                target=run_triggers,
                args=(ids[start : start + TRIGGERS_PER_PROCESS], sidecar.url, sidecar.token, poll_interval,
                      stream, events, started),
                daemon=True,
            )  # fmt: skip
            worker.start()
            workers.append((worker, started))
        for _, started in workers:
            started.wait(120)
        time.sleep(15)  # every trigger has asked once, the sidecar's first cycles are over
        control = httpx.Client(base_url=base, timeout=30)
        stats0 = control.get("/control/stats").json()
        cpu0, wall0 = proc.cpu_times(), time.monotonic()
        rng = random.Random(tasks)
        doomed = rng.sample(ids, exits)
        exited_at: dict[str, float] = {}
        answers: list[float] = []
        next_exit = 0
        with sidecar.client() as client:
            while time.monotonic() - wall0 < window:
                if next_exit < len(doomed) and time.monotonic() - wall0 >= next_exit * window / len(doomed):
                    job_id = doomed[next_exit]
                    exited_at[job_id] = control.post(
                        "/control/exit", json={"agent": agent_of[job_id], "job_id": job_id}
                    ).json()["at"]
                    next_exit += 1
                asked = time.perf_counter()
                client.get(f"/jobs/{rng.choice(ids)}").raise_for_status()
                answers.append(time.perf_counter() - asked)
                time.sleep(rng.uniform(0.02, 0.08))
        cpu1, wall1 = proc.cpu_times(), time.monotonic()
        stats1 = control.get("/control/stats").json()
        heard: dict[str, float] = {}
        deadline = time.monotonic() + 15
        while len(heard) < len(exited_at) and time.monotonic() < deadline:
            try:
                job_id, at, _ = events.get(timeout=1)
            except queue.Empty:
                continue
            heard[job_id] = at
        elapsed = wall1 - wall0
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
        per_agent = [
            (stats1["requests"].get(a, 0) - stats0["requests"].get(a, 0)) / elapsed
            for a in (f"agent-{i}" for i in range(AGENTS))
        ]
        latencies = [heard[j] - exited_at[j] for j in exited_at if j in heard]
        unheard = [j for j in exited_at if j not in heard]
        if unheard:  # what the router DB says of them: recorded but not heard, or not recorded
            check = RouterDB(db_url)
            found = check.get_many(unheard)
            check.dispose()
            result["unheard"] = dict(
                Counter(str(found[j].status) if j in found else "missing" for j in unheard)
            )
        result |= {
            "window_s": round(elapsed, 1),
            "sidecar_cpu_pct_of_core": round(100 * cpu, 1),
            "answer_p50_ms": round(1000 * statistics.median(answers), 1),
            "answer_p99_ms": round(1000 * _pct(answers, 0.99), 1),
            "answers_sampled": len(answers),
            "agent_requests_per_s_mean": round(statistics.mean(per_agent), 2),
            "agent_requests_per_s_max": round(max(per_agent), 2),
            "exits": len(exited_at),
            "events_heard": len(latencies),
            "exit_to_event_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "exit_to_event_p99_s": round(_pct(latencies, 0.99), 3) if latencies else None,
            "exit_to_event_max_s": round(max(latencies), 3) if latencies else None,
            "sidecar_rss_mb": round(proc.memory_info().rss / 2**20, 1),
        }
        control.close()
    finally:
        for worker, _ in workers:
            worker.terminate()
            worker.join(10)
        sidecar.stop()
        standins.terminate()
        standins.join(10)
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tasks | sidecar CPU (% of a core) | answer p50 / p99 | agent requests/s (mean / max) "
        "| exit -> event p50 / p99 / max (n) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tasks']:,} | {r['sidecar_cpu_pct_of_core']} % "
            f"| {r['answer_p50_ms']} / {r['answer_p99_ms']} ms "
            f"| {r['agent_requests_per_s_mean']} / {r['agent_requests_per_s_max']} "
            f"| {r['exit_to_event_p50_s']} / {r['exit_to_event_p99_s']} / {r['exit_to_event_max_s']} s "
            f"({r['events_heard']}/{r['exits']}) |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", type=int, nargs="*", default=[1000, 2000, 10000], help="deferred tasks per case"
    )
    parser.add_argument("--window", type=float, default=40.0, help="measured seconds per case")
    parser.add_argument("--exits", type=int, default=30, help="jobs made to exit during the window")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="the operator's poll_interval")
    parser.add_argument("--stream-output", action="store_true", help="the triggers read the output too")
    parser.add_argument(
        "--push", action="store_true", help="agents register and push exits in heartbeats (else [[agents]])"
    )
    args = parser.parse_args()
    rows = []
    for tasks in args.tasks:
        print(f"running {tasks} deferred tasks ...", file=sys.stderr, flush=True)
        rows.append(
            run_case(
                tasks,
                window=args.window,
                exits=min(args.exits, math.ceil(tasks / 10)),
                poll_interval=args.poll_interval,
                stream=args.stream_output,
                push=args.push,
            )
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
