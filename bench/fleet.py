"""Registration at scale: 1,000 agents heartbeating to one real sidecar, and routing among them.

    python -m bench.fleet                       # 1,000 agents, heartbeat every 10 s, 60 s measured, SQLite
    python -m bench.fleet --postgres            # the same on PostgreSQL (127.0.0.1:5432)
    python -m bench.fleet --agents 200 --seconds 20

The agents are stand-ins served by this process (one aiohttp server; each agent a base path
``/a/<id>``), answering what the sidecar asks of them: ``/health`` (the call back at registration),
``/jobs`` (the orphan sweep) and ``/run``. Each registers with the fleet token and a credential of its
own, then heartbeats every ``--every`` seconds with that credential alone (the router DB's update of
its own row), spread evenly, as real agents do; meanwhile jobs are submitted by labels, so every
routing decision weighs all of them. Reported: heartbeats handled per second and their latency, router
DB writes per second (one statement per heartbeat; on PostgreSQL the server's own commit count), the
sidecar's CPU, and submission latency with the whole fleet to choose from.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import secrets
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import psutil
import psycopg
from aiohttp import web

from agent_api.registration import CREDENTIAL_HEADER, identity_fingerprint
from harness.processes import free_port
from harness.served import ServedAirflow
from harness.sidecar import SidecarProcess

FLEET_TOKEN = "bench-fleet-token"
SUBMIT_PER_SECOND = 5
SHOWN: dict[str, dict[str, str]] = {}  # agent id -> what its /healthz shows of its registration


def standin_agents() -> web.Application:
    """Every agent at ``/a/{agent_id}``: healthy, empty, taking every job."""

    async def health(request: web.Request) -> web.Response:
        agent_id = request.match_info["agent_id"]
        shown = {"status": "ok", "agent_id": agent_id, "jobs_running": 0, "max_jobs": 0}
        return web.json_response({**shown, "registration": SHOWN.get(agent_id, {})})

    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": []})

    async def run(request: web.Request) -> web.Response:
        body = await request.json()
        now = datetime.now(UTC).isoformat()
        job = {"job_id": body["job_id"], "status": "RUNNING", "pid": 1, "rc": None}
        return web.json_response({**job, "started_at": now, "finished_at": None, "reason": None}, status=201)

    app = web.Application()
    app.router.add_get("/a/{agent_id}/health", health)
    app.router.add_get("/a/{agent_id}/healthz", health)
    app.router.add_get("/a/{agent_id}/jobs", jobs)
    app.router.add_post("/a/{agent_id}/run", run)
    return app


async def heartbeats(
    base: str, sidecar: str, count: int, every: float, until: float, latencies: list[float], errors: list[str]
) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:

        async def agent(n: int) -> None:
            agent_id = f"vm-{n:04}"
            proof, instance = secrets.token_hex(32), str(uuid.uuid4())
            SHOWN[agent_id] = {"identity_fingerprint": identity_fingerprint(proof), "instance": instance}
            body = {
                "url": f"{base}/a/{agent_id}",
                "instance": instance,
                "labels": ["pool", f"zone-{n % 4}"],
                "max_jobs": 8,
                "heartbeat_seconds": every,
                "version": "bench",
                "call_token": secrets.token_hex(32),
            }
            # The fleet token until the first heartbeat is taken (a bootstrap), the credential always.
            headers = {CREDENTIAL_HEADER: proof, "Authorization": f"Bearer {FLEET_TOKEN}"}
            await asyncio.sleep(every * n / count)  # spread evenly over the period
            while time.monotonic() < until:
                started = time.monotonic()
                try:
                    put = session.put(f"{sidecar}/agents/{agent_id}", json=body, headers=headers)
                    async with put as answer:
                        await answer.read()
                        if answer.status != 200:
                            errors.append(f"{answer.status}")
                        else:
                            headers.pop("Authorization", None)
                            latencies.append(time.monotonic() - started)
                except aiohttp.ClientError as exc:
                    errors.append(type(exc).__name__)
                await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))

        await asyncio.gather(*(agent(n) for n in range(count)))


async def submissions(
    sidecar: str, token: str, until: float, latencies: list[float], airflow: ServedAirflow
) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        n = 0
        while time.monotonic() < until:
            task = f"t{n}"
            airflow.call_soon(airflow.standin.add, "bench", "r", task, -1, "running", 1)
            body = {"command": "true", "dag_id": "bench", "task_id": task, "run_id": "r", "try_number": 1}
            started = time.monotonic()
            async with session.post(f"{sidecar}/jobs", json={**body, "labels": ["pool"]}) as answer:
                await answer.read()
                if answer.status in (200, 201):
                    latencies.append(time.monotonic() - started)
            n += 1
            await asyncio.sleep(1 / SUBMIT_PER_SECOND)


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def pg_commits(url: str) -> int:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return int(row[0]) if row else 0


def pg_database() -> str:
    name = f"bench_fleet_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--every", type=float, default=10.0, help="heartbeat period, seconds")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="measured time, after every agent registered"
    )
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()

    from harness.served import ServedApp

    agents_server = ServedApp(standin_agents())
    agents_server.start()
    airflow = ServedAirflow()
    airflow.start()
    db_url = pg_database() if args.postgres else ""
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = SidecarProcess(
            workdir=Path(tmp) / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[],
            api_version="v2",
            db_url=db_url,
            port=free_port(),
            fleet_token=FLEET_TOKEN,
        )
        with sidecar:
            assert sidecar.proc is not None
            proc = psutil.Process(sidecar.proc.pid)
            warm = args.every + 5  # every agent registered once (and called back) before measuring
            beats: list[float] = []
            errors: list[str] = []
            submits: list[float] = []
            start = time.monotonic()
            until = start + warm + args.seconds

            async def scenario() -> tuple[float, float, int, int]:
                beating = asyncio.create_task(
                    heartbeats(agents_server.url, sidecar.url, args.agents, args.every, until, beats, errors)
                )
                await asyncio.sleep(warm)
                registered = len(beats)
                beats.clear()
                cpu0, commits0, wall0 = (
                    proc.cpu_times(),
                    pg_commits(db_url) if db_url else 0,
                    time.monotonic(),
                )
                await submissions(sidecar.url, sidecar.token, until, submits, airflow)
                cpu1, wall1 = proc.cpu_times(), time.monotonic()  # the window ends with the submissions
                commits = (pg_commits(db_url) - commits0) if db_url else 0
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
                cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall1 - wall0)
                return cpu, wall1 - wall0, registered, commits

            cpu, wall, registered, commits = asyncio.run(scenario())
            listed = len(sidecar.client().get("/agents").json()["agents"])
    airflow.stop()
    agents_server.stop()
    rate = len(beats) / wall
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"# bench.fleet: {args.agents} agents, heartbeat every {args.every:g} s, {backend}")
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    print(f"{when}, {platform.node()}, {psutil.cpu_count()} cores, Python {platform.python_version()}")
    print(f"registered before measuring: {registered} heartbeats accepted, {listed} agents listed at the end")
    print(
        f"heartbeats handled: {rate:.1f}/s (planned {args.agents / args.every:.1f}/s), errors {len(errors)}"
    )
    print(f"heartbeat latency: p50 {pct(beats, 0.5):.1f} ms, p99 {pct(beats, 0.99):.1f} ms")
    writes = commits / wall if args.postgres else rate
    counted = "server commits" if args.postgres else "one upsert per heartbeat"
    print(f"router DB writes: {writes:.1f}/s ({counted})")
    print(f"sidecar CPU: {100 * cpu:.0f} % of a core (heartbeats, reads of the agents table, routing)")
    print(
        f"submissions by labels among {args.agents} agents: {len(submits)} at {SUBMIT_PER_SECOND}/s, "
        f"p50 {pct(submits, 0.5):.1f} ms, p99 {pct(submits, 0.99):.1f} ms"
    )
    if errors:
        print("errors:", ", ".join(sorted(set(errors)))[:500], f"({statistics.mode(errors)} most)")


if __name__ == "__main__":
    main()
