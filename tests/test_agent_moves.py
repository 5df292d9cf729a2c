"""A registered agent restarted at a new URL moves its registration there at once and keeps its jobs.

Real agent and sidecar processes: an agent runs a job, is stopped (SIGKILL, or SIGTERM), and starts
again on the same home at another port (once over HTTPS). Within a couple of heartbeats GET /agents
shows the new URL, the job runs on with its process, a drain asked of the sidecar while the agent was
down reaches it there, and a stop through the sidecar reaches it there. A holder of only the fleet
token (a fresh home) claiming the id elsewhere while the agent lives, a copy of its identity started
elsewhere while it answers or while it is only paused, a fresh home at its own URL while its job is
active, and hand-made heartbeats naming its URL or instance are refused and change nothing. The
decision (:func:`reconciler.fleet.registry.judge_claim` and the call-back's checks), the home's identity
files and the router DB's rule are pinned without a network; the sidecar's judgement and what the
agent sends, and where, against in-process servers (the fast tier).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import httpx
import psutil
import pytest
from aiohttp import ClientSession, web
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.test_utils import TestServer

from agent.config import ConfigError, load_config
from agent.identity import IDENTITY_FILE, INSTANCES_FILE, load_identity
from agent.registration import Refused as AgentRefused
from agent.registration import Registration, Work
from agent_api.client import AgentUnavailable
from agent_api.protocol import ProtocolError
from agent_api.registration import (
    CREDENTIAL_HEADER,
    MAX_PREVIOUS_INSTANCES,
    Heartbeat,
    identity_fingerprint,
    parse_heartbeat,
)
from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow
from harness.sidecar import SidecarProcess
from harness.wiring import nobody_waits
from reconciler.api.statuses import status_of
from reconciler.config import FleetConfig
from reconciler.errors import Refused
from reconciler.fleet import call_back as call_back_module
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.claims import (
    Claim,
    Unanswered,
    call_back_problem,
    judge_claim,
    moved_in_place,
    still_there_problem,
    unanswered,
)
from reconciler.fleet.liveness import Fleet
from reconciler.fleet.registry import Accepted, Registry
from reconciler.metrics import Metrics
from router_db import AgentConflict, AgentRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey
from servicekit.credentials import Secret
from tests import heartbeats
from tests.certs import make_ca

FLEET_TOKEN = "fleet-token-for-moves"
PROOF = "ab" * 32
FINGERPRINT = identity_fingerprint(PROOF)
LOST_AFTER = 8.0  # a restart beats it with room to spare on a busy machine
HEARTBEAT = 0.5
MOVED_WITHIN = 6 * HEARTBEAT  # "a couple of heartbeats", with slack for a loaded machine


def fleet_config(ca_file: Path | None = None, lost_after: float = LOST_AFTER) -> str:
    ca = f'registration_ca_file = "{ca_file}"\n' if ca_file is not None else ""
    return (
        f"[leader]\nlease_seconds = {lost_after - 1}\n"
        f"[fleet]\nlost_after_seconds = {lost_after}\ncheck_interval_seconds = 0.2\n"
        f"check_timeout_seconds = 1.0\n{ca}"
    )


def sidecar_for(
    tmp_path: Path, airflow: ServedAirflow, ca_file: Path | None = None, lost_after: float = LOST_AFTER
) -> SidecarProcess:
    return SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[],
        api_version="v2",
        interval_seconds=0.3,
        fleet_token=FLEET_TOKEN,
        extra_config=fleet_config(ca_file, lost_after),
    )


def registering(home: Path, sidecar: SidecarProcess, agent_id: str, **kwargs: Any) -> AgentProcess:
    """An agent that registers itself with the fleet token (no token of its own)."""
    port = kwargs.pop("port", None) or free_port()
    scheme = "https" if kwargs.get("tls_cert_file") is not None else "http"
    return AgentProcess(
        home,
        agent_id=agent_id,
        port=port,
        token=FLEET_TOKEN,
        accepted_tokens=[],
        extra_config=f'heartbeat_seconds = {HEARTBEAT}\nlabels = ["pool"]\n',
        extra_env={
            "ROUTER_URL": sidecar.url,
            "SELF_URL": f"{scheme}://127.0.0.1:{port}",
            "AGENTIC_FLEET_TOKEN": FLEET_TOKEN,
            "AGENTIC_AGENT_TOKEN": "",
        },
        **kwargs,
    )


def agents(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}


def verifying(agent: AgentProcess) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(agent.ca_file)) if agent.ca_file is not None else True


def health(agent: AgentProcess) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{agent.url}/healthz", timeout=5, verify=verifying(agent)).json()
    return answer


def on_agent(agent: AgentProcess, job_id: str) -> dict[str, Any]:
    verify = verifying(agent)
    headers = {"Authorization": f"Bearer {agent.call_token()}"}  # as the sidecar calls it
    answer: dict[str, Any] = httpx.get(
        f"{agent.url}/jobs/{job_id}", headers=headers, timeout=5, verify=verify
    ).json()
    return answer


def submit(client: httpx.Client, airflow: ServedAirflow, task_id: str) -> str:
    airflow.call_soon(airflow.standin.add, "d", "r", task_id, -1, "running", 1)
    body = {"command": "sleep 300", "dag_id": "d", "task_id": task_id, "run_id": "r", "try_number": 1}
    answer = client.post("/jobs", json={**body, "labels": ["pool"]})
    assert answer.status_code == 201, answer.text
    job_id: str = answer.json()["job_id"]
    return job_id


def alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def end(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).kill()


def keeps_its_job_at_the_new_url(
    client: httpx.Client,
    airflow: ServedAirflow,
    sidecar: SidecarProcess,
    moved: AgentProcess,
    *,
    job: str,
    task: str,
    pid: int,
    down_since: float,
    state: str = "live",
) -> None:
    """After the move: the job outlives lost_after_seconds, RUNNING with its process alive, and a stop
    through the sidecar reaches the agent at its new URL."""
    time.sleep(max(0.0, down_since + LOST_AFTER + 2 - time.monotonic()))
    entry = agents(client)["vm-m"]
    assert (entry["url"], entry["state"], entry["active_jobs"]) == (moved.url, state, 1), entry
    assert client.get(f"/jobs/{job}").json()["status"] == "RUNNING"
    assert on_agent(moved, job)["status"] == "RUNNING" and alive(pid)
    assert "stopping orphan" not in sidecar.log_path.read_text()
    airflow.mark(("d", "r", task, -1), "failed")  # a person marks the task failed
    stopped = wait_for(lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "FAILED" and j, "stop")
    assert "failed" in stopped["reason"] and stopped["rc"] is not None
    wait_for(lambda: not alive(pid), "the job's process gone")
    assert f"POST /stop/{job}" in moved.log_text()  # the stop went to the new URL


def test_an_agent_killed_and_restarted_at_a_new_port_moves_there_and_keeps_its_job(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """SIGKILL, then the same id and home at another port: accepted within a couple of heartbeats. A
    drain asked of the sidecar while the agent was down follows it to the new URL."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        first = registering(tmp_path / "vm", sidecar, "vm-m")
        stack.callback(first.stop)
        first.start()
        wait_for(lambda: agents(client).get("vm-m", {}).get("state") == "live", "registered")
        job = submit(client, airflow, "long")
        pid = wait_for(lambda: on_agent(first, job)["pid"], "the job's pid")
        first.kill()  # the agent only: its job runs on
        down_since = time.monotonic()
        drained = client.post("/agents/vm-m/drain")  # cannot reach it: the sidecar keeps the flag
        assert drained.status_code == 502 and agents(client)["vm-m"]["state"] == "draining"

        moved = stack.enter_context(registering(tmp_path / "vm", sidecar, "vm-m"))
        assert moved.url != first.url
        wait_for(lambda: agents(client)["vm-m"]["url"] == moved.url, "the new URL", timeout=MOVED_WITHIN)
        assert health(moved)["registration"]["registered"] is True
        assert "agent vm-m moved from " + first.url + " to " + moved.url in sidecar.log_path.read_text()
        assert agents(client)["vm-m"]["state"] == "draining"  # the pending drain still routes around it
        # The sidecar sends its flag again (every 30 s while the agent disagrees): to the new URL.
        wait_for(lambda: health(moved)["draining"], "the drain delivered at the new URL", timeout=40)
        keeps_its_job_at_the_new_url(
            client,
            airflow,
            sidecar,
            moved,
            job=job,
            task="long",
            pid=pid,
            down_since=down_since,
            state="draining",
        )


def test_an_agent_stopped_and_restarted_over_https_moves_there_and_keeps_its_job(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """SIGTERM (a planned restart: its last heartbeat says it leaves, its job keeps the row), then the
    same id and home served over HTTPS at another port."""
    ca = make_ca(tmp_path / "ca", "Moves CA")
    server = ca.issue(tmp_path / "server", hosts=["127.0.0.1"])
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow, ca.cert_file))
        client = stack.enter_context(sidecar.client())
        first = registering(tmp_path / "vm", sidecar, "vm-m")
        stack.callback(first.stop)
        first.start()
        wait_for(lambda: agents(client).get("vm-m", {}).get("state") == "live", "registered")
        job = submit(client, airflow, "long")
        pid = wait_for(lambda: on_agent(first, job)["pid"], "the job's pid")
        assert first.terminate() == 0
        down_since = time.monotonic()

        moved = registering(
            tmp_path / "vm",
            sidecar,
            "vm-m",
            tls_cert_file=server.cert_file,
            tls_key_file=server.key_file,
            ca_file=ca.cert_file,
        )
        stack.enter_context(moved)
        assert moved.url.startswith("https://") and first.url.startswith("http://")
        wait_for(lambda: agents(client)["vm-m"]["url"] == moved.url, "the new URL", timeout=MOVED_WITHIN)
        keeps_its_job_at_the_new_url(
            client, airflow, sidecar, moved, job=job, task="long", pid=pid, down_since=down_since
        )


def test_a_claim_with_only_the_fleet_token_is_refused_while_the_agent_lives(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """A fresh home claiming the id at another URL, and hand-made heartbeats naming the agent's own
    URL or instance, are refused; the registration, the job and where stops go stay as they were."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        real = stack.enter_context(registering(tmp_path / "vm", sidecar, "vm-m"))
        wait_for(lambda: agents(client).get("vm-m", {}).get("state") == "live", "registered")
        job = submit(client, airflow, "long")
        pid = wait_for(lambda: on_agent(real, job)["pid"], "the job's pid")
        before = agents(client)["vm-m"]

        impostor = stack.enter_context(registering(tmp_path / "impostor", sidecar, "vm-m"))
        error = wait_for(lambda: health(impostor)["registration"]["last_error"], "the impostor's refusal")
        assert "409" in error and "held by the agent registered at " + real.url in error
        assert "proves another identity" in error

        # A copy of the agent's identity (not of its jobs) started elsewhere while the agent answers:
        # a second process of one home, refused while the first one answers at its URL.
        (tmp_path / "copy").mkdir(mode=0o700)
        for name in ("identity", "instances.json"):
            shutil.copy2(tmp_path / "vm" / name, tmp_path / "copy" / name)
        copy = stack.enter_context(registering(tmp_path / "copy", sidecar, "vm-m"))
        error = wait_for(lambda: health(copy)["registration"]["last_error"], "the copy's refusal")
        assert "409" in error and "still answers at " + real.url in error

        instance = health(real)["registration"]["instance"]
        own = health(impostor)["registration"]["instance"]
        impostors_proof = load_identity(tmp_path / "impostor", "x").proof("vm-m")  # its own home's
        forged: list[tuple[dict[str, Any], int, str]] = [
            # The agent's own URL and instance, with another identity or none.
            ({"url": real.url, "instance": instance, "identity_proof": "0" * 64}, 409, "another identity"),
            ({"url": real.url, "instance": instance}, 409, "another identity"),
            # Its own URL as a new process of another home, or of none: no restart while it lives.
            ({"url": real.url, "instance": "forged-1", "identity_proof": "1" * 64}, 409, "another identity"),
            # Proving none, where the registration has an identity: no restart either (no call-back).
            ({"url": real.url, "instance": "forged-2"}, 409, "proves no identity"),
            # The impostor's own URL, identity and instance, citing the agent's instance as its history.
            (
                {
                    "url": impostor.url,
                    "instance": own,
                    "identity_proof": impostors_proof,
                    "previous_instances": [instance],
                },
                409,
                "proves another identity",
            ),
        ]
        with sidecar.client(FLEET_TOKEN) as fleet:
            for body, status, said in forged:
                answer = fleet.put("/agents/vm-m", json={**body, "labels": ["stolen"], "draining": True})
                assert (answer.status_code, said in answer.json()["error"]) == (status, True), answer.text
                assert impostors_proof not in answer.text
        time.sleep(3 * HEARTBEAT)
        after = agents(client)["vm-m"]
        assert (after["url"], after["labels"], after["state"]) == (real.url, ["pool"], "live")
        assert after["last_contact_at"] >= before["last_contact_at"]
        assert client.get(f"/jobs/{job}").json()["status"] == "RUNNING" and alive(pid)
        assert health(real)["registration"]["registered"] is True
        log = sidecar.log_path.read_text()
        assert "moved from" not in log and FLEET_TOKEN not in log and impostors_proof not in log

        airflow.mark(("d", "r", "long", -1), "failed")
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "FAILED", "the stop")
        wait_for(lambda: not alive(pid), "the job's process gone")
        assert f"POST /stop/{job}" in real.log_text() and f"/stop/{job}" not in impostor.log_text()


def test_a_copy_of_the_home_waits_while_the_agent_is_only_paused_at_its_url(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """SIGSTOP: the agent answers nothing at its URL (as a paused or overloaded one would) while a copy
    of its home claims the id elsewhere. The copy is refused, as a slow process may run on; once the
    agent goes on, it keeps its registration and its job."""
    lost_after = 4 * call_back_module.VERIFY_TIMEOUT_SECONDS  # the pause outlasts the look at its URL
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow, lost_after=lost_after))
        client = stack.enter_context(sidecar.client())
        real = registering(tmp_path / "vm", sidecar, "vm-m")
        stack.callback(real.stop)
        real.start()
        wait_for(lambda: agents(client).get("vm-m", {}).get("state") == "live", "registered")
        job = submit(client, airflow, "long")
        pid = wait_for(lambda: on_agent(real, job)["pid"], "the job's pid")
        (tmp_path / "copy").mkdir(mode=0o700)
        for name in ("identity", "instances.json"):
            shutil.copy2(tmp_path / "vm" / name, tmp_path / "copy" / name)
        copy = stack.enter_context(registering(tmp_path / "copy", sidecar, "vm-m"))
        wait_for(lambda: "still answers" in (health(copy)["registration"]["last_error"] or ""), "refused")

        os.kill(real.pid, signal.SIGSTOP)  # the agent only: its job runs on
        stack.callback(os.kill, real.pid, signal.SIGCONT)  # before it is stopped, whatever happens

        def judged() -> str:
            if agents(client)["vm-m"]["url"] == copy.url:
                return "moved to the copy"
            error: str = health(copy)["registration"]["last_error"] or ""
            return error if "still answers" not in error else ""

        error = wait_for(
            judged, "the copy's claim judged", timeout=4 * call_back_module.VERIFY_TIMEOUT_SECONDS
        )
        assert "409" in error and "no clear answer" in error and real.url in error, error
        assert agents(client)["vm-m"]["url"] == real.url
        os.kill(real.pid, signal.SIGCONT)
        time.sleep(3 * HEARTBEAT)  # it heartbeats again, and the copy is judged again
        entry = agents(client)["vm-m"]
        assert (entry["url"], entry["state"], entry["active_jobs"]) == (real.url, "live", 1), entry
        assert health(real)["registration"]["registered"] is True
        assert client.get(f"/jobs/{job}").json()["status"] == "RUNNING" and alive(pid)
        assert "still answers at " + real.url in health(copy)["registration"]["last_error"]
        assert "moved from" not in sidecar.log_path.read_text()


def test_another_home_at_the_agents_url_takes_no_registration_while_its_job_is_active(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """SIGKILL (its job runs on), then a fresh home (a VM rebuilt with an empty disk, or an impostor
    with the fleet token) at the same URL: no restart of the agent, refused while the registration
    holds its job; it registers once its predecessor is silent and its job has ended."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        first = registering(tmp_path / "vm", sidecar, "vm-m")
        stack.callback(first.stop)
        first.start()
        wait_for(lambda: agents(client).get("vm-m", {}).get("state") == "live", "registered")
        job = submit(client, airflow, "long")
        pid = wait_for(lambda: on_agent(first, job)["pid"], "the job's pid")
        stack.callback(end, pid)  # no agent knows it once its own is killed
        first.kill()

        rebuilt = stack.enter_context(registering(tmp_path / "rebuilt", sidecar, "vm-m", port=first.port))
        assert rebuilt.url == first.url

        def judged() -> str:
            shown = health(rebuilt)["registration"]
            said: str = shown["last_error"] or ("registered at once" if shown["registered"] else "")
            return said

        error = wait_for(judged, "the rebuilt home's claim judged")
        assert "409" in error and "another identity" in error and first.url in error, error
        assert "taking the id over" not in sidecar.log_path.read_text()
        # Its job ends (the agent at its URL knows none of it, or by the lost rule); then the id is free.
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "FAILED", "the job ended")
        wait_for(lambda: health(rebuilt)["registration"]["registered"], "registered", timeout=LOST_AFTER + 10)
        assert "taking the id over from the agent at " + first.url in sidecar.log_path.read_text()


# ------------------------------------------------------------------ the decision, without a network


def held(**changes: Any) -> AgentRecord:
    moment = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    record = AgentRecord(
        agent_id="vm-m",
        url="http://old:8791",
        labels=(),
        max_jobs=0,
        jobs_running=1,
        version="1",
        draining=False,
        instance="i-1",
        registered_at=moment,
        last_heartbeat_at=moment,
        identity_fingerprint=FINGERPRINT,
    )
    return replace(record, **changes)


NEW_URL = "https://new:8791"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("row", "url", "instance", "fingerprint", "history", "claim", "said"),
    [
        (None, NEW_URL, "i-2", FINGERPRINT, [], Claim.NEW, ""),
        (held(), "http://old:8791", "i-1", FINGERPRINT, [], Claim.BEAT, ""),
        (held(identity_fingerprint=""), "http://old:8791", "i-1", "", [], Claim.BEAT, ""),  # older agent
        # A row an older replica wrote (no identity) takes its own process's: a rolling upgrade.
        (held(identity_fingerprint=""), "http://old:8791", "i-1", FINGERPRINT, [], Claim.BEAT, ""),
        (held(), "http://old:8791", "i-2", FINGERPRINT, [], Claim.RESTART, ""),  # its home, restarted
        # A row without identity takes its restarted process's (an older agent or replica wrote it).
        (held(identity_fingerprint=""), "http://old:8791", "i-2", FINGERPRINT, [], Claim.RESTART, ""),
        (held(identity_fingerprint=""), "http://old:8791", "i-2", "", [], Claim.RESTART, ""),
        # Another home at the row's URL (a rebuilt VM, an impostor): no restart.
        (held(), "http://old:8791", "i-2", "f" * 64, [], Claim.TAKEOVER, "another identity"),
        # One proving none there, where the row has an identity: a fleet-token holder speaking for the
        # agent (or one rolled back past identities): no restart either.
        (held(), "http://old:8791", "i-2", "", [], Claim.TAKEOVER, "proves no identity"),
        (held(), NEW_URL, "i-2", FINGERPRINT, ["i-0", "i-1"], Claim.MOVE, ""),
        (held(), NEW_URL, "i-2", FINGERPRINT, ["i-0"], Claim.TAKEOVER, "not in this home's instance history"),
        (held(), NEW_URL, "i-2", FINGERPRINT, [], Claim.TAKEOVER, "not in this home's instance history"),
        (held(), NEW_URL, "i-2", "f" * 64, ["i-1"], Claim.TAKEOVER, "another identity"),
        (held(), NEW_URL, "i-2", "", ["i-1"], Claim.TAKEOVER, "proves no identity"),
        (held(identity_fingerprint=""), NEW_URL, "i-2", FINGERPRINT, ["i-1"], Claim.TAKEOVER, "holds no"),
        (held(identity_fingerprint=""), NEW_URL, "i-2", "", ["i-1"], Claim.TAKEOVER, "holds no identity"),
    ],
)
def test_what_a_heartbeat_claims_against_the_registration(
    row: AgentRecord | None,
    url: str,
    instance: str,
    fingerprint: str,
    history: list[str],
    claim: Claim,
    said: str,
) -> None:
    judged = judge_claim(row, url=url, instance=instance, fingerprint=fingerprint, previous_instances=history)
    assert (judged.claim, judged.refusal) == (claim, "")
    assert said in judged.unproven and bool(judged.unproven) == bool(said)


@pytest.mark.fast
@pytest.mark.parametrize("fingerprint", ["f" * 64, ""])
def test_the_same_instance_with_another_identity_is_refused_outright(fingerprint: str) -> None:
    for url in ("http://old:8791", NEW_URL):
        judged = judge_claim(held(), url=url, instance="i-1", fingerprint=fingerprint, previous_instances=[])
        assert "another identity" in judged.refusal


@pytest.mark.fast
def test_the_same_instance_at_another_address_is_refused_outright() -> None:
    """One process keeps the address it started with; its instance is public in /healthz, so the
    same instance elsewhere is a credential replayed, not the agent (a restart moves, as a new one)."""
    judged = judge_claim(held(), url=NEW_URL, instance="i-1", fingerprint=FINGERPRINT, previous_instances=[])
    assert judged.claim is Claim.BEAT and "keeps its address" in judged.refusal


def healthz(agent_id: str = "vm-m", **registration: Any) -> dict[str, Any]:
    return {"status": "ok", "agent_id": agent_id, "registration": registration}


@pytest.mark.fast
@pytest.mark.parametrize(
    ("answer", "fingerprint", "said"),
    [
        (healthz(instance="i-2", identity_fingerprint=FINGERPRINT), FINGERPRINT, None),
        ({"status": "ok", "agent_id": "vm-m"}, "", None),  # an older agent, an older heartbeat
        (healthz("vm-x", instance="i-2", identity_fingerprint=FINGERPRINT), FINGERPRINT, "answers as 'vm-x'"),
        (healthz(instance="i-2", identity_fingerprint="f" * 64), FINGERPRINT, "does not hold the identity"),
        ({"status": "ok", "agent_id": "vm-m"}, FINGERPRINT, "does not hold the identity"),
        (healthz(instance="i-2", identity_fingerprint=FINGERPRINT), "", "proves an identity this heartbeat"),
        (healthz(instance="i-9", identity_fingerprint=FINGERPRINT), FINGERPRINT, "another process"),
        (healthz(identity_fingerprint=FINGERPRINT), FINGERPRINT, "another process"),
    ],
)
def test_the_call_back_checks_who_sent_the_heartbeat(
    answer: dict[str, Any], fingerprint: str, said: str | None
) -> None:
    problem = call_back_problem(answer, agent_id="vm-m", url=NEW_URL, instance="i-2", fingerprint=fingerprint)
    assert (problem is None) == (said is None) and (said is None or said in str(problem)), problem


@pytest.mark.fast
@pytest.mark.parametrize(
    ("answer", "waits"),
    [
        (Unanswered("connection refused", gone=True), False),  # nothing listens there: the process is gone
        (Unanswered("no answer within 5 s"), True),  # a paused or overloaded process may run on
        (healthz("vm-other", instance="x"), False),  # another agent has the address now
        (
            healthz(instance="i-2", identity_fingerprint=FINGERPRINT),
            False,
        ),  # the mover itself, by its old name
        (healthz(instance="i-1", identity_fingerprint=FINGERPRINT), True),  # the old process still runs
        ({"status": "ok", "agent_id": "vm-m"}, True),  # something answering as the agent, unknown which
    ],
)
def test_a_move_waits_while_another_process_answers_at_the_old_url(
    answer: dict[str, Any] | Unanswered, waits: bool
) -> None:
    problem = still_there_problem(answer, agent_id="vm-m", old_url="http://old:8791", instance="i-2")
    assert (problem is not None) == waits
    assert problem is None or any(
        f"{said} at http://old:8791" in problem for said in ("still answers", "gives no clear answer")
    )


def failed_look(
    cause: BaseException, connector: type[aiohttp.ClientConnectorError] | None = None
) -> Exception:
    """The client's error for a look at the old URL that failed with ``cause`` (in the connector)."""
    key = ConnectionKey("old", 8791, False, True, None, None, None, None)
    try:
        try:
            raise connector(key, cause) if connector is not None else cause  # type: ignore[arg-type]
        except (aiohttp.ClientError, TimeoutError):
            raise AgentUnavailable("GET http://old:8791/health: failed") from None
    except AgentUnavailable as exc:
        return exc


@pytest.mark.fast
@pytest.mark.parametrize(
    ("error", "gone"),
    [
        (
            failed_look(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), aiohttp.ClientConnectorError),
            True,
        ),
        (failed_look(socket.gaierror(socket.EAI_NONAME, "unknown"), aiohttp.ClientConnectorDNSError), True),
        # A resolver that failed, a host that cannot be reached, a proxy refusing: nothing is known.
        (failed_look(socket.gaierror(socket.EAI_AGAIN, "try again"), aiohttp.ClientConnectorDNSError), False),
        (failed_look(OSError(errno.EHOSTUNREACH, "unreachable"), aiohttp.ClientConnectorError), False),
        (failed_look(OSError(errno.ECONNREFUSED, "refused"), aiohttp.ClientProxyConnectionError), False),
        (failed_look(TimeoutError()), False),  # paused, overloaded
        (failed_look(aiohttp.ServerDisconnectedError()), False),
        (AgentUnavailable("GET http://old:8791/health: HTTP 503: overloaded"), False),
        (ValueError("ca_file: cannot load"), False),
    ],
)
def test_only_a_refused_connection_or_a_name_that_does_not_exist_shows_the_old_process_gone(
    error: Exception, gone: bool
) -> None:
    assert unanswered(error).gone == gone


@pytest.mark.fast
@pytest.mark.parametrize(
    ("old", "new", "in_place"),
    [
        ("http://vm:8791", "https://vm:8791", True),  # http to https on one port: the mover's own socket
        ("https://VM:8791/", "http://vm:8791", True),
        ("http://vm:8791", "https://vm:8792", False),
        ("http://vm", "https://vm", False),  # 80 and 443
        ("http://proxy:443/a", "https://proxy:443/b", False),  # paths a proxy may send to two processes
    ],
)
def test_a_move_from_http_to_https_in_place_is_not_asked_at_its_own_socket(
    old: str, new: str, in_place: bool
) -> None:
    assert moved_in_place(old, new) == in_place


@pytest.mark.fast
def test_a_heartbeat_carries_its_identity_evidence_and_never_shows_the_proof() -> None:
    beat = Heartbeat(
        url="http://x:1", instance="i-2", identity_proof=PROOF, previous_instances=("i-0", "i-1")
    )
    assert parse_heartbeat(beat.to_json()) == beat
    assert PROOF not in repr(beat)
    older = {"url": "http://x:1", "instance": "i-2"}  # an agent older than identities
    assert (parse_heartbeat(older).identity_proof, parse_heartbeat(older).previous_instances) == ("", ())
    bad: list[tuple[dict[str, Any], str]] = [
        ({"identity_proof": PROOF.upper()}, "identity_proof"),
        ({"identity_proof": PROOF[:-1]}, "identity_proof"),
        ({"identity_proof": 7}, "identity_proof"),
        ({"previous_instances": "i-1"}, "previous_instances"),
        ({"previous_instances": ["a b"]}, "previous_instances"),
        ({"previous_instances": ["i"] * (MAX_PREVIOUS_INSTANCES + 1)}, "previous_instances"),
    ]
    for change, field in bad:
        with pytest.raises(ProtocolError, match=field) as refused:
            parse_heartbeat({**older, **change})
        assert PROOF.upper() not in str(refused.value)


# ---------------------------------------------------------------------- the agent's home, on disk


@pytest.mark.fast
def test_the_identity_is_made_once_private_and_kept_and_the_instances_recorded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = load_identity(home, "i-1")
    assert first.previous_instances == ()
    assert stat.S_IMODE((home / IDENTITY_FILE).stat().st_mode) == 0o600
    again = load_identity(home, "i-2")
    assert again.secret == first.secret and again.previous_instances == ("i-1",)
    assert again.proof("vm-m") == first.proof("vm-m") != first.proof("vm-n")  # bound to the agent id
    assert first.secret.hex() not in repr(again) and first.secret.hex() not in first.proof("vm-m")
    for n in range(3, 40):
        last = load_identity(home, f"i-{n}")
    assert last.previous_instances == tuple(f"i-{n}" for n in range(39 - MAX_PREVIOUS_INSTANCES, 39))
    # A wiped home is a new identity; a damaged instance history is an empty one.
    assert load_identity(tmp_path / "rebuilt", "i-1").secret != first.secret
    (home / INSTANCES_FILE).write_text("{not json")
    assert load_identity(home, "i-50").previous_instances == ()
    assert load_identity(home, "i-51").previous_instances == ("i-50",)


@pytest.mark.fast
def test_a_damaged_identity_stops_the_agent_instead_of_making_it_someone_else(tmp_path: Path) -> None:
    load_identity(tmp_path, "i-1")
    (tmp_path / IDENTITY_FILE).write_text("not-a-secret-at-all\n")
    with pytest.raises(ConfigError, match="not an agent identity") as refused:
        load_identity(tmp_path, "i-2")
    assert "not-a-secret" not in str(refused.value)
    (tmp_path / IDENTITY_FILE).write_text("ab" * 32)
    (tmp_path / IDENTITY_FILE).chmod(0o644)
    load_identity(tmp_path, "i-3")  # readable by others: made private again
    assert stat.S_IMODE((tmp_path / IDENTITY_FILE).stat().st_mode) == 0o600


# ------------------------------------------------------------------- the router DB's rule, atomically


def beat(**changes: Any) -> AgentRecord:
    return replace(held(), **changes)


def test_the_router_db_moves_a_busy_registration_only_as_judged(router_db: RouterDB) -> None:
    """A live agent with a running job: another URL is refused unless the move names this very row
    (URL and instance) and brings its identity; the same instance may not change identity."""
    moment = datetime.now(UTC)
    router_db.heartbeat_agent(beat(last_heartbeat_at=moment), alive_after=moment - timedelta(days=1))
    job, _ = router_db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "vm-m", "sleep 1"))
    router_db.mark_running(job.job_id, source="test")
    live = moment - timedelta(seconds=60)
    moved = beat(url=NEW_URL, instance="i-2")
    refused: list[tuple[AgentRecord, tuple[str, str] | None]] = [
        (moved, None),  # not judged a move
        (moved, ("http://old:8791", "i-0")),  # judged against another row
        (moved, ("http://elsewhere:1", "i-1")),
        (replace(moved, identity_fingerprint="f" * 64), ("http://old:8791", "i-1")),  # not its identity
        (replace(moved, identity_fingerprint=""), ("http://old:8791", "i-1")),
        (beat(identity_fingerprint="f" * 64), None),  # the same instance, another identity
        (beat(url=NEW_URL, identity_fingerprint=""), None),
    ]
    for record, moving_from in refused:
        with pytest.raises(AgentConflict):
            router_db.heartbeat_agent(record, alive_after=live, moving_from=moving_from)
        assert [(a.url, a.instance) for a in router_db.registered_agents()] == [("http://old:8791", "i-1")]
    stored = router_db.heartbeat_agent(moved, alive_after=live, moving_from=("http://old:8791", "i-1"))
    assert (stored.url, stored.instance, stored.identity_fingerprint) == (NEW_URL, "i-2", FINGERPRINT)
    # The old process cannot take it back: the row it would be judged against is gone.
    with pytest.raises(AgentConflict):
        router_db.heartbeat_agent(beat(), alive_after=live, moving_from=("http://old:8791", "i-1"))
    assert router_db.registered_agent("vm-m") == stored
    assert router_db.get(job.job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_an_older_registration_without_identity_moves_as_before(router_db: RouterDB) -> None:
    """A row an older agent made holds no fingerprint: a proof cannot move it (nothing to compare), a
    restart at its URL records the identity, which a later move then needs."""
    moment = datetime.now(UTC)
    old = beat(identity_fingerprint="", last_heartbeat_at=moment)
    router_db.heartbeat_agent(old, alive_after=moment - timedelta(days=1))
    job, _ = router_db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "vm-m", "sleep 1"))
    live = moment - timedelta(seconds=60)
    with pytest.raises(AgentConflict):
        router_db.heartbeat_agent(
            beat(url=NEW_URL, instance="i-2"), alive_after=live, moving_from=("http://old:8791", "i-1")
        )
    upgraded = router_db.heartbeat_agent(beat(instance="i-2"), alive_after=live)  # restarted at its URL
    assert upgraded.identity_fingerprint == FINGERPRINT
    moved = router_db.heartbeat_agent(
        beat(url=NEW_URL, instance="i-3"), alive_after=live, moving_from=("http://old:8791", "i-2")
    )
    assert moved.url == NEW_URL and router_db.get(job.job_id) is not None


def test_another_live_agent_at_an_address_is_found_by_the_router_db_clock(router_db: RouterDB) -> None:
    now = router_db.now()
    router_db.heartbeat_agent(beat(agent_id="vm-a", url=NEW_URL, last_heartbeat_at=now), alive_after=now)
    router_db.heartbeat_agent(
        beat(agent_id="vm-b", url="http://b:1", last_heartbeat_at=now - timedelta(minutes=10)),
        alive_after=now,
    )
    found = router_db.live_agent_at(NEW_URL, other_than="vm-m", alive_within=60)
    assert found is not None and found.agent_id == "vm-a"
    assert router_db.live_agent_at(NEW_URL, other_than="vm-a", alive_within=60) is None
    assert router_db.live_agent_at("http://b:1", other_than="vm-m", alive_within=60) is None  # silent
    assert router_db.live_agent_at("http://b:1", other_than="vm-m", alive_within=3600) is not None


@pytest.mark.fast
def test_an_agent_restarted_on_its_home_presents_the_same_proof_and_its_predecessor(tmp_path: Path) -> None:
    """What the heartbeat sender presents, and what /healthz shows of it for the call-back."""
    bodies: list[dict[str, Any]] = []

    async def sidecar(request: web.Request) -> web.Response:
        said = {
            "credential": request.headers.get(CREDENTIAL_HEADER),
            "auth": request.headers.get("Authorization"),
        }
        bodies.append({**await request.json(), **said})
        return web.json_response({"agent_id": "vm-m"})

    async def two_starts() -> list[Registration]:
        app = web.Application()
        app.router.add_put("/agents/{agent_id}", sidecar)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        env = {
            "AGENTIC_FLEET_TOKEN": "fleet",
            "ROUTER_URL": str(server.make_url("")),
            "AGENT_ID": "vm-m",
            "AGENTIC_AGENT_HOME": str(tmp_path),
        }
        starts = []
        try:
            for _ in range(2):
                sender = Registration(
                    load_config(None, environ=env),
                    token=Secret(("fleet",)),
                    work=lambda: Work(0, 0, False),
                    version="t",
                )
                async with ClientSession() as session:
                    await sender.beat(session)
                starts.append(sender)
        finally:
            await server.close()
        return starts

    first, second = asyncio.run(two_starts())
    # The credential travels in its header, never in the body; each start's first heartbeat carries
    # the fleet token too (a bootstrap), with the call token the sidecar will present.
    assert bodies[0]["credential"] == bodies[1]["credential"] and "identity_proof" not in bodies[0]
    assert [body["auth"] for body in bodies] == ["Bearer fleet"] * 2
    assert bodies[0]["call_token"] == bodies[1]["call_token"] != bodies[0]["credential"]
    assert (bodies[0]["previous_instances"], bodies[1]["previous_instances"]) == ([], [first.instance])
    shown = second.status()
    assert (shown["instance"], shown["identity_fingerprint"]) == (
        second.instance,
        identity_fingerprint(bodies[1]["credential"]),
    )
    assert bodies[1]["credential"] not in json.dumps(shown) and bodies[1]["call_token"] not in json.dumps(
        shown
    )


def test_a_row_an_older_replica_wrote_takes_its_own_processs_identity(router_db: RouterDB) -> None:
    """A rolling upgrade: an older replica wrote the row without an identity; the same process, now
    heartbeating to an upgraded replica with its proof, is accepted (not refused until it restarts)."""
    moment = datetime.now(UTC)
    router_db.heartbeat_agent(beat(identity_fingerprint="", last_heartbeat_at=moment), alive_after=moment)
    job, _ = router_db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "vm-m", "sleep 1"))
    router_db.mark_running(job.job_id, source="test")  # busy: only the rules for a live holder apply
    live = moment - timedelta(seconds=60)
    stored = router_db.heartbeat_agent(beat(), alive_after=live)  # the same instance, with its proof
    assert stored.identity_fingerprint == FINGERPRINT
    with pytest.raises(AgentConflict):  # once taken, the identity is the row's
        router_db.heartbeat_agent(beat(identity_fingerprint="f" * 64), alive_after=live)


@pytest.mark.fast
def test_a_heartbeat_sent_before_a_drain_and_read_after_it_does_not_route_there_again(tmp_path: Path) -> None:
    """The drain reaches the agent (it answers draining), then the router DB still holds a heartbeat
    the agent sent before it: the sidecar keeps the agent draining until a heartbeat carries the flag."""
    db = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    db.create_schema()
    config = FleetConfig(lost_after_seconds=8.0, check_interval_seconds=0.2, check_timeout_seconds=1.0)

    async def drain(request: web.Request) -> web.Response:
        return web.json_response({"agent_id": "vm-d", "draining": True, "jobs_running": 0})

    async def scenario() -> list[str]:
        app = web.Application()
        app.router.add_post("/drain", drain)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        pool = AgentPool([], {}, timeout=1, stop_timeout=1)
        fleet = Fleet(
            db=db,
            agents=pool,
            metrics=Metrics(),
            config=config,
            registered_token=Secret("t"),
            changed=nobody_waits,
        )
        url = str(server.make_url("")).rstrip("/")
        try:
            heartbeats.beat(db, "vm-d", url=url)
            await fleet.load_registered()
            seen: list[str] = [fleet.report("vm-d").state]
            await fleet.drain("vm-d", draining=True)
            seen.append(fleet.report("vm-d").state)
            await fleet.load_registered()  # the heartbeat sent before the drain arrived
            seen.append(fleet.report("vm-d").state)
            heartbeats.beat(db, "vm-d", url=url, draining=True)
            await fleet.load_registered()
            seen.append(fleet.report("vm-d").state)
            return seen
        finally:
            await fleet.close()
            await pool.close()
            await server.close()
            db.dispose()

    assert asyncio.run(scenario()) == ["live", "draining", "draining", "draining"]


# --------------------------------------------------------- the sidecar's judgement, in one process


OTHER_PROOF = "cd" * 32  # another home's


def agent_app(agent_id: str, *, instance: str, proof: str, health_delay: float = 0.0) -> web.Application:
    """An agent as the sidecar's call-back sees it: its /health, and a /jobs that takes any token."""

    async def health(request: web.Request) -> web.Response:
        await asyncio.sleep(health_delay)
        shown = {"instance": instance, "identity_fingerprint": identity_fingerprint(proof)}
        return web.json_response({"status": "ok", "agent_id": agent_id, "registration": shown})

    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": []})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/jobs", jobs)
    return app


async def serve(app: web.Application) -> tuple[TestServer, str]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, str(server.make_url("")).rstrip("/")


def registry_on(db: RouterDB) -> Registry:
    config = FleetConfig(lost_after_seconds=LOST_AFTER, check_interval_seconds=0.2, check_timeout_seconds=1.0)
    return Registry(db=db, token=Secret(FLEET_TOKEN), static_ids=(), config=config, metrics=Metrics())


def registered(db: RouterDB, *, url: str, silent_for: float = 0.0, busy: bool = True) -> AgentRecord:
    """vm-m's row at ``url`` (instance i-1, the home of PROOF), ``silent_for`` seconds ago by the router
    DB's clock, with a running job if ``busy``."""
    moment = db.now() - timedelta(seconds=silent_for)
    row = db.heartbeat_agent(beat(url=url, last_heartbeat_at=moment), alive_after=moment)
    if busy:
        job, _ = db.submit(NewJob(TaskInstanceKey(dag_id="d", task_id="t", run_id="r"), "vm-m", "sleep 1"))
        db.mark_running(job.job_id, source="test")
    return row


@pytest.mark.fast
@pytest.mark.parametrize(
    ("old", "moves", "said"),
    [
        ("paused", False, "no clear answer"),  # a live agent, only slow: a copy must not take its place
        ("failing", False, "no clear answer"),  # something answers there, but not as an agent
        ("refused", True, ""),  # nothing listens at the old address: the process there is gone
    ],
)
def test_a_move_waits_while_the_old_url_gives_no_clear_answer(
    db: RouterDB, monkeypatch: pytest.MonkeyPatch, old: str, moves: bool, said: str
) -> None:
    """The old process does not answer within the call-back's timeout (paused, overloaded) or answers
    garbage: the move waits, as the old process may run on. A refused connection shows it gone."""
    monkeypatch.setattr(call_back_module, "VERIFY_TIMEOUT_SECONDS", 0.5)

    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=503, text="overloaded")

    async def scenario() -> Accepted | Refused:
        servers = []
        mover, new_url = await serve(agent_app("vm-m", instance="i-2", proof=PROOF))
        servers.append(mover)
        if old == "paused":
            server, old_url = await serve(agent_app("vm-m", instance="i-1", proof=PROOF, health_delay=30))
            servers.append(server)
        elif old == "failing":
            app = web.Application()
            app.router.add_get("/health", failing)
            server, old_url = await serve(app)
            servers.append(server)
        else:
            old_url = f"http://127.0.0.1:{free_port()}"
        registered(db, url=old_url)
        registry = registry_on(db)
        claim = Heartbeat(url=new_url, instance="i-2", identity_proof=PROOF, previous_instances=("i-1",))
        try:
            return await registry.heartbeat("vm-m", claim)
        except Refused as exc:
            return exc
        finally:
            await registry.close()
            for server in servers:
                await server.close()

    outcome = asyncio.run(scenario())
    row = db.registered_agent("vm-m")
    assert row is not None
    if moves:
        assert isinstance(outcome, Accepted) and (row.instance, row.url) == ("i-2", outcome.record.url)
    else:
        assert isinstance(outcome, Refused) and status_of(outcome) == 409, outcome
        assert said in str(outcome) and row.instance == "i-1"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("silent_for", "busy", "taken"),
    [
        (0.0, True, False),  # live, with a running job: another home must not take it
        (0.0, False, False),  # live: its process may still run
        (3 * LOST_AFTER, True, False),  # silent, but its job has not ended yet
        (3 * LOST_AFTER, False, True),  # silent and without active jobs: anyone may take it, as before
    ],
)
def test_another_identity_at_the_registrations_url_takes_it_only_by_the_takeover_rule(
    db: RouterDB, silent_for: float, busy: bool, taken: bool
) -> None:
    """A rebuilt VM (a new home) or an impostor at the agent's own URL is no restart of the agent."""

    async def scenario() -> Accepted | Refused:
        server, url = await serve(agent_app("vm-m", instance="i-2", proof=OTHER_PROOF))
        registered(db, url=url, silent_for=silent_for, busy=busy)
        registry = registry_on(db)
        try:
            return await registry.heartbeat(
                "vm-m", Heartbeat(url=url, instance="i-2", identity_proof=OTHER_PROOF)
            )
        except Refused as exc:
            return exc
        finally:
            await registry.close()
            await server.close()

    outcome = asyncio.run(scenario())
    row = db.registered_agent("vm-m")
    assert row is not None
    if taken:
        assert isinstance(outcome, Accepted) and row.identity_fingerprint == identity_fingerprint(OTHER_PROOF)
    else:
        assert isinstance(outcome, Refused) and status_of(outcome) == 409, outcome
        assert "another identity" in str(outcome)
        assert (row.instance, row.identity_fingerprint) == ("i-1", FINGERPRINT)


# ------------------------------------------------------------------ what the agent sends, and where


class Resolving(aiohttp.abc.AbstractResolver):
    """Every host name resolves to 127.0.0.1: a sidecar at a name that is not loopback, on this machine."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


def sender(tmp_path: Path, router_url: str) -> Registration:
    env = {
        "AGENTIC_FLEET_TOKEN": "fleet",
        "ROUTER_URL": router_url,
        "AGENT_ID": "vm-m",
        "AGENTIC_AGENT_HOME": str(tmp_path / "home"),
    }
    config = load_config(None, environ=env)
    return Registration(config, token=Secret(("fleet",)), work=lambda: Work(0, 0, False), version="t")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("host", "private"), [("sidecar.example", False), ("localhost", True), ("127.0.0.1", True)]
)
def test_the_fleet_token_bootstraps_once_and_the_credential_speaks_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, private: bool
) -> None:
    """The first heartbeat of a process carries the fleet token (a bootstrap) and the credential;
    once accepted, the credential alone. Over plain http to a host that is not this machine both
    cross the network in clear text: the agent says so once, never quoting either."""
    seen: list[tuple[str | None, str | None]] = []

    async def sidecar(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Authorization"), request.headers.get(CREDENTIAL_HEADER)))
        return web.json_response({"agent_id": "vm-m"})

    async def two_beats() -> Registration:
        app = web.Application()
        app.router.add_put("/agents/{agent_id}", sidecar)
        server, _ = await serve(app)
        try:
            registration = sender(tmp_path, f"http://{host}:{server.port}")
            connector = aiohttp.TCPConnector(resolver=Resolving())
            async with ClientSession(connector=connector) as session:
                await registration.beat(session)
                await registration.beat(session)
        finally:
            await server.close()
        return registration

    with caplog.at_level(logging.INFO, logger="agent.registration"):
        registration = asyncio.run(two_beats())
    proof = load_identity(tmp_path / "home", "x").proof("vm-m")
    assert seen == [("Bearer fleet", proof), (None, proof)] and registration.registered
    assert registration.status()["identity_fingerprint"] == identity_fingerprint(proof)
    said = [r.getMessage() for r in caplog.records if "clear text" in r.getMessage()]
    assert len(said) == (0 if private else 1) and proof not in caplog.text and "Bearer" not in caplog.text


@pytest.mark.fast
@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_heartbeat_follows_no_redirect(tmp_path: Path, status: int) -> None:
    """A sidecar (or anything at router_url) answering with a redirect does not get the heartbeat sent
    on elsewhere: neither its fleet token nor its identity proof leaves for the other address."""
    elsewhere: list[str] = []

    async def capture(request: web.Request) -> web.Response:
        elsewhere.append(await request.text() + request.headers.get("Authorization", ""))
        return web.json_response({"agent_id": "vm-m"})

    async def beat() -> tuple[Registration, BaseException | None]:
        other = web.Application()
        other.router.add_route("*", "/agents/{agent_id}", capture)
        other_server, other_url = await serve(other)

        async def redirect(request: web.Request) -> web.Response:
            return web.Response(status=status, headers={"Location": f"{other_url}/agents/vm-m"})

        app = web.Application()
        app.router.add_put("/agents/{agent_id}", redirect)
        server, url = await serve(app)
        registration = sender(tmp_path, url)
        try:
            async with ClientSession() as session:
                await registration.beat(session)
        except (AgentRefused, aiohttp.ClientError) as exc:
            return registration, exc
        finally:
            await server.close()
            await other_server.close()
        return registration, None

    registration, refused = asyncio.run(beat())
    assert elsewhere == [] and not registration.registered
    assert (
        isinstance(refused, AgentRefused) and f"HTTP {status}" in str(refused) and "redirect" in str(refused)
    )


@pytest.mark.fast
def test_an_agent_that_shows_its_instance_is_spoken_for_only_by_that_instance() -> None:
    """An agent that keeps its proof off plain http shows no fingerprint, but still its instance: a
    heartbeat naming its URL with another instance (a fleet-token holder's) is not from it."""
    shown = {"agent_id": "vm-m", "registration": {"instance": "real-1", "identity_fingerprint": ""}}
    args = {"agent_id": "vm-m", "url": "http://vm:8791", "fingerprint": ""}
    assert call_back_problem(shown, instance="real-1", **args) is None
    assert "another process (instance 'real-1')" in str(call_back_problem(shown, instance="forged", **args))
    assert call_back_problem({"agent_id": "vm-m"}, instance="any", **args) is None  # older than instances
