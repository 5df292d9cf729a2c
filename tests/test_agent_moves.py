"""A registered agent restarted at a new URL moves its registration there at once and keeps its jobs.

Real agent and sidecar processes: an agent runs a job, is stopped (SIGKILL, or SIGTERM), and starts
again on the same home at another port (once over HTTPS). Within a couple of heartbeats GET /agents
shows the new URL, the job runs on with its process, a drain asked of the sidecar while the agent was
down reaches it there, and a stop through the sidecar reaches it there. A holder of only the fleet
token (a fresh home) claiming the id elsewhere while the agent lives, a copy of its identity started
elsewhere while it answers, and hand-made heartbeats naming its URL or instance are refused and change
nothing. The decision (:func:`reconciler.registry.judge_claim` and the call-back's checks), the home's
identity files and the router DB's rule are pinned without a network (the fast tier).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import stat
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from agent.config import ConfigError, load_config
from agent.identity import IDENTITY_FILE, INSTANCES_FILE, load_identity
from agent.registration import Registration, Work
from agent_api.protocol import ProtocolError
from agent_api.registration import (
    MAX_PREVIOUS_INSTANCES,
    Heartbeat,
    identity_fingerprint,
    parse_heartbeat,
)
from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow
from harness.sidecar import SidecarProcess
from reconciler.agents import AgentPool
from reconciler.config import FleetConfig
from reconciler.fleet import Fleet
from reconciler.metrics import Metrics
from reconciler.registry import Claim, call_back_problem, judge_claim, still_there_problem
from router_db import AgentConflict, AgentRecord, JobStatus, NewJob, RouterDB, TaskInstanceKey
from servicekit.credentials import Secret
from tests.certs import make_ca

FLEET_TOKEN = "fleet-token-for-moves"
PROOF = "ab" * 32
FINGERPRINT = identity_fingerprint(PROOF)
LOST_AFTER = 8.0  # a restart beats it with room to spare on a busy machine
HEARTBEAT = 0.5
MOVED_WITHIN = 6 * HEARTBEAT  # "a couple of heartbeats", with slack for a loaded machine


def fleet_config(ca_file: Path | None = None) -> str:
    ca = f'registration_ca_file = "{ca_file}"\n' if ca_file is not None else ""
    return (
        f"[leader]\nlease_seconds = {LOST_AFTER - 1}\n"
        f"[fleet]\nlost_after_seconds = {LOST_AFTER}\ncheck_interval_seconds = 0.2\n"
        f"check_timeout_seconds = 1.0\n{ca}"
    )


def sidecar_for(tmp_path: Path, airflow: ServedAirflow, ca_file: Path | None = None) -> SidecarProcess:
    return SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[],
        api_version="v2",
        interval_seconds=0.3,
        fleet_token=FLEET_TOKEN,
        extra_config=fleet_config(ca_file),
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
    headers = {"Authorization": f"Bearer {FLEET_TOKEN}"}
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
        assert "409" in error and "held by a live agent at " + real.url in error
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
            # Its own URL as a new process: the agent answering there did not send it.
            ({"url": real.url, "instance": "forged-1", "identity_proof": "1" * 64}, 422, "does not hold"),
            ({"url": real.url, "instance": "forged-2"}, 422, "proves an identity this heartbeat does not"),
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
        (held(), NEW_URL, "i-1", FINGERPRINT, [], Claim.BEAT, ""),  # the same process, renamed
        (held(identity_fingerprint=""), "http://old:8791", "i-1", "", [], Claim.BEAT, ""),  # older agent
        # A row an older replica wrote (no identity) takes its own process's: a rolling upgrade.
        (held(identity_fingerprint=""), "http://old:8791", "i-1", FINGERPRINT, [], Claim.BEAT, ""),
        (held(), "http://old:8791", "i-2", "", [], Claim.RESTART, ""),
        (held(), "http://old:8791", "i-2", "f" * 64, [], Claim.RESTART, ""),  # a new home there
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
        (None, False),  # nothing answers at the old URL: the process there is gone
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
    answer: dict[str, Any] | None, waits: bool
) -> None:
    problem = still_there_problem(answer, agent_id="vm-m", old_url="http://old:8791", instance="i-2")
    assert (problem is not None) == waits
    assert problem is None or "still answers at http://old:8791" in problem


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
        bodies.append(await request.json())
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
    assert bodies[0]["identity_proof"] == bodies[1]["identity_proof"]
    assert (bodies[0]["previous_instances"], bodies[1]["previous_instances"]) == ([], [first.instance])
    shown = second.status()
    assert (shown["instance"], shown["identity_fingerprint"]) == (
        second.instance,
        identity_fingerprint(bodies[1]["identity_proof"]),
    )
    assert bodies[1]["identity_proof"] not in json.dumps(shown)


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

    def beat(url: str, *, draining: bool) -> None:
        now = db.now()
        record = AgentRecord(
            agent_id="vm-d",
            url=url,
            labels=(),
            max_jobs=0,
            jobs_running=0,
            version="",
            draining=draining,
            instance="one",
            registered_at=now,
            last_heartbeat_at=now,
            heartbeat_seconds=0.5,
        )
        db.heartbeat_agent(record, alive_after=now)

    async def scenario() -> list[str]:
        app = web.Application()
        app.router.add_post("/drain", drain)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        pool = AgentPool([], {}, timeout=1, stop_timeout=1)
        fleet = Fleet(db=db, agents=pool, metrics=Metrics(), config=config, registered_token=Secret("t"))
        url = str(server.make_url("")).rstrip("/")
        try:
            beat(url, draining=False)
            await fleet.load_registered()
            seen = [fleet.report("vm-d").state]
            await fleet.drain("vm-d", draining=True)
            seen.append(fleet.report("vm-d").state)
            await fleet.load_registered()  # the heartbeat sent before the drain arrived
            seen.append(fleet.report("vm-d").state)
            beat(url, draining=True)
            await fleet.load_registered()
            seen.append(fleet.report("vm-d").state)
            return seen
        finally:
            await fleet.close()
            await pool.close()
            await server.close()
            db.dispose()

    assert asyncio.run(scenario()) == ["live", "draining", "draining", "draining"]
