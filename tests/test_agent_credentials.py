"""Each registered agent speaks with a credential of its own, and the fleet token opens registration alone.

Real agent processes and a real sidecar process, spoken to over HTTP only, as a holder of one secret
would: the fleet token opens no agent's API, and no agent's heartbeat; one agent's call token opens
that agent alone; agents registered before the fleet token was rotated away live on with their
credentials; ``agentic agents revoke`` refuses an agent's next heartbeat and every registration of its
id until ``agentic agents forget``; and a credential renews itself before its lifetime ends, while one
that outlived it (an agent paused that long) bootstraps again with the fleet token.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from agent_api.registration import CREDENTIAL_HEADER, Heartbeat
from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow
from harness.sidecar import SidecarProcess
from tests.test_registration import FLEET, FLEET_TOKEN, LOST_AFTER, agents, registration, submit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def airflow() -> Any:
    served = ServedAirflow()
    served.start()
    yield served
    served.stop()


def sidecar_for(tmp_path: Path, airflow: ServedAirflow, extra: str = "", **kwargs: Any) -> SidecarProcess:
    return SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=[],
        api_version="v2",
        fleet_token=kwargs.pop("fleet_token", FLEET_TOKEN),
        extra_config=FLEET + extra,
        **kwargs,
    )


def registering(home: Path, sidecar: SidecarProcess, agent_id: str, **kwargs: Any) -> AgentProcess:
    """An agent with no token of its own: the fleet token registers it, its credential does the rest."""
    port = kwargs.pop("port", None) or free_port()
    fleet = kwargs.pop("fleet_token", FLEET_TOKEN)
    return AgentProcess(
        home,
        agent_id=agent_id,
        port=port,
        token=fleet,
        accepted_tokens=[],
        extra_config='heartbeat_seconds = 0.5\nlabels = ["pool"]\n' + kwargs.pop("extra_config", ""),
        extra_env={
            "ROUTER_URL": sidecar.url,
            "SELF_URL": f"http://127.0.0.1:{port}",
            "AGENTIC_FLEET_TOKEN": fleet,
            "AGENTIC_AGENT_TOKEN": "",
        },
        **kwargs,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def running(client: httpx.Client, airflow: ServedAirflow, task: str, agent: AgentProcess) -> tuple[str, int]:
    """A job of a running task placed on ``agent``, once it runs: its id and its process's pid (read
    from the agent as the sidecar reads it, with its call token)."""
    airflow.call_soon(airflow.standin.add, "d", "r", task, -1, "running", 1)
    answer = submit(client, task, "sleep 300", agent_id=agent.agent_id)
    assert answer.status_code == 201, answer.text
    job: str = answer.json()["job_id"]

    def pid() -> Any:
        return (
            httpx.get(f"{agent.url}/jobs/{job}", headers=bearer(agent.call_token()), timeout=5)
            .json()
            .get("pid")
        )

    return job, int(wait_for(pid, f"{task}'s pid"))


def stopped_by_airflow(client: httpx.Client, airflow: ServedAirflow, task: str, job: str, pid: int) -> None:
    """Airflow says the task failed: the sidecar stops the job on its agent (with that agent's token)."""
    airflow.mark(("d", "r", task, -1), "failed")
    wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "FAILED", f"{task} stopped", 30)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", "gone", 15)


def cli(sidecar: SidecarProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTIC_")}
    env.update(AGENTIC_SIDECAR_URL=sidecar.url, AGENTIC_TOKEN=sidecar.token)
    return subprocess.run(
        [sys.executable, "-m", "agentic_cli", "agents", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_fleet_token_opens_no_agent_and_each_call_token_one(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """Before: every registered agent took the fleet token on /run, /stop, /drain and /jobs. Now none
    does; the sidecar calls each with the token its heartbeats carry, which opens that agent alone."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        one = stack.enter_context(registering(tmp_path / "one", sidecar, "vm-1"))
        two = stack.enter_context(registering(tmp_path / "two", sidecar, "vm-2"))
        client = stack.enter_context(sidecar.client())
        wait_for(lambda: {"vm-1", "vm-2"} <= set(agents(client)), "both registered")

        run = {"job_id": "by-the-fleet-token", "payload": {"command": "id"}}
        for agent in (one, two):
            with httpx.Client(base_url=agent.url, headers=bearer(FLEET_TOKEN), timeout=5) as fleet:
                for answer in (
                    fleet.post("/run", json=run),
                    fleet.get("/jobs"),
                    fleet.post("/drain", json={}),
                    fleet.post("/stop/anything"),
                ):
                    assert answer.status_code == 401, answer.text
        with httpx.Client(base_url=two.url, headers=bearer(one.call_token()), timeout=5) as other:
            assert other.post("/run", json=run).status_code == 401  # vm-1's token opens vm-1 alone
            assert other.get("/jobs").status_code == 401
        with httpx.Client(base_url=one.url, headers=bearer(one.call_token()), timeout=5) as own:
            assert own.get("/jobs").status_code == 200
        assert one.call_token() != two.call_token()

        # The sidecar still runs and stops jobs there, with each agent's own token.
        for task, agent in (("t1", one), ("t2", two)):
            job, pid = running(client, airflow, task, agent)
            stopped_by_airflow(client, airflow, task, job, pid)
        for agent in (one, two):
            assert "by-the-fleet-token" not in agent.log_text()
        log = sidecar.log_path.read_text()
        assert one.call_token() not in log and two.call_token() not in log and FLEET_TOKEN not in log


def test_a_fleet_token_holder_cannot_speak_for_a_registered_agent(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """Heartbeats for a live agent's id with the fleet token (its URL, a new instance, no credential or
    another one), or with a credential that is not its own, are refused before any call-back: the job
    they report SUCCEEDED stays RUNNING, its process lives, and the registration stays as it was."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        real = stack.enter_context(registering(tmp_path / "real", sidecar, "vm-r"))
        client = stack.enter_context(sidecar.client())
        wait_for(lambda: "vm-r" in agents(client), "registered")
        job, pid = running(client, airflow, "long", real)
        done = {"job_id": job, "status": "SUCCEEDED", "rc": 0, "pid": pid}
        forged = Heartbeat(url=real.url, instance="forged-1", labels=("pool",)).to_json() | {"jobs": [done]}
        other = "ab" * 32
        attempts = [
            (bearer(FLEET_TOKEN), forged, 409),
            (bearer(FLEET_TOKEN), forged | {"identity_proof": other}, 409),
            ({**bearer(FLEET_TOKEN), CREDENTIAL_HEADER: other}, forged, 409),
            ({CREDENTIAL_HEADER: other}, forged, 401),  # a credential alone: not vm-r's
            ({CREDENTIAL_HEADER: "not-hex"}, forged, 401),
            ({}, forged, 401),
        ]
        for headers, body, status in attempts:
            answer = httpx.put(f"{sidecar.url}/agents/vm-r", json=body, headers=headers, timeout=10)
            assert answer.status_code == status, answer.text
            assert other not in answer.text and FLEET_TOKEN not in answer.text
        time.sleep(1.5)
        assert client.get(f"/jobs/{job}").json()["status"] == "RUNNING" and psutil.pid_exists(pid)
        listed = agents(client)["vm-r"]
        assert (listed["url"], listed["state"]) == (real.url, "live")
        assert registration(real)["registered"] is True
        log = sidecar.log_path.read_text()
        assert "forged-1" not in real.log_text() and other not in log
        stopped_by_airflow(client, airflow, "long", job, pid)


def test_registered_agents_live_on_once_the_fleet_token_is_rotated_away(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """The fleet token is a bootstrap token: the sidecar's file changes to a new one the agents never
    held, and the registered agent keeps heartbeating with its credential, stays live for several
    lost_after_seconds, and takes and stops a job; only a new registration needs the new token."""
    token_file = tmp_path / "fleet-token"
    token_file.write_text("fleet-old-token\n", encoding="utf-8")
    extra = f'registration_token_file = "{token_file}"\n'
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow, extra, fleet_token=None))
        agent = stack.enter_context(
            registering(tmp_path / "a", sidecar, "vm-a", fleet_token="fleet-old-token")
        )
        client = stack.enter_context(sidecar.client())
        wait_for(lambda: agents(client).get("vm-a", {}).get("state") == "live", "registered")
        fresh = token_file.with_name("fleet-token.new")
        fresh.write_text("fleet-new-token\n", encoding="utf-8")
        os.replace(fresh, token_file)
        wait_for(lambda: "reloaded from" in sidecar.log_path.read_text(), "the new fleet token read", 10)

        before = registration(agent)["last_heartbeat_at"]
        time.sleep(2 * LOST_AFTER)
        after = registration(agent)
        assert after["registered"] and after["last_error"] is None and after["last_heartbeat_at"] > before
        assert agents(client)["vm-a"]["state"] == "live"
        job, pid = running(client, airflow, "after-rotation", agent)
        stopped_by_airflow(client, airflow, "after-rotation", job, pid)

        late = stack.enter_context(
            registering(tmp_path / "late", sidecar, "vm-l", fleet_token="fleet-old-token")
        )
        assert "401" in wait_for(lambda: registration(late)["last_error"], "the old token's refusal")
        assert "vm-l" not in agents(client)


def test_registered_agents_live_on_with_a_sidecar_restarted_without_any_fleet_token(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """Registration of new agents off (no fleet token on the restarted sidecar): the agents registered
    already heartbeat with their credentials, stay live, and their jobs are stopped as ever; a new
    agent is refused (404, registration off)."""
    with ExitStack() as stack:
        sidecar = sidecar_for(tmp_path, airflow)
        sidecar.start()
        agent = stack.enter_context(registering(tmp_path / "a", sidecar, "vm-k"))
        with sidecar.client() as client:
            wait_for(lambda: "vm-k" in agents(client), "registered")
            job, pid = running(client, airflow, "kept", agent)
        sidecar.stop()
        again = sidecar_for(tmp_path, airflow, fleet_token=None, port=sidecar.port)
        stack.enter_context(again)
        client = stack.enter_context(again.client())
        before = registration(agent)["last_heartbeat_at"]
        time.sleep(2 * LOST_AFTER)
        after = registration(agent)
        assert after["last_error"] is None and after["last_heartbeat_at"] > before
        assert agents(client)["vm-k"]["state"] == "live"
        assert client.get(f"/jobs/{job}").json()["status"] == "RUNNING" and psutil.pid_exists(pid)
        stopped_by_airflow(client, airflow, "kept", job, pid)
        late = stack.enter_context(registering(tmp_path / "late", again, "vm-late"))
        assert "404" in wait_for(lambda: registration(late)["last_error"], "registration off")


def test_a_revoked_agent_is_refused_routed_around_lost_and_then_forgotten(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """`agentic agents revoke`: the agent's next heartbeat is refused (403, a metric), no new job goes
    there, its running job ends FAILED once it is lost, and its id takes no registration, fleet token
    or not, restarted or not, until `agentic agents forget`; then it registers again."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow, "orphan_sweep_seconds = 1.0\n"))
        agent = stack.enter_context(registering(tmp_path / "a", sidecar, "vm-x"))
        client = stack.enter_context(sidecar.client())
        wait_for(lambda: "vm-x" in agents(client), "registered")
        job, pid = running(client, airflow, "held", agent)

        assert cli(sidecar, "forget", "vm-x").returncode != 0  # live, with a job: kept
        done = cli(sidecar, "revoke", "vm-x")
        assert done.returncode == 0 and "vm-x: credential revoked at" in done.stdout, done.stderr
        error = wait_for(lambda: registration(agent)["last_error"], "the agent's refusal")
        assert "403" in error and "revoked" in error
        assert agents(client)["vm-x"]["state"] == "revoked"
        airflow.call_soon(airflow.standin.add, "d", "r", "new", -1, "running", 1)
        assert submit(client, "new", labels=["pool"]).status_code == 503  # routed around
        metrics = client.get("/metrics").text
        assert 'reconciler_agent_heartbeats_total{result="revoked"}' in metrics
        ended = wait_for(
            lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "FAILED" and j,
            "the revoked agent's job ended once it is lost",
            4 * LOST_AFTER,
        )
        assert "vm-x" in ended["reason"]
        # Ended in the router DB, and stopped there too: a revoked agent is still swept (its call token).
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", "gone", 15)

        agent.stop()  # a restart of it bootstraps with the fleet token: refused too
        again = stack.enter_context(registering(tmp_path / "a", sidecar, "vm-x", port=agent.port))
        error = wait_for(lambda: registration(again)["last_error"], "the restart's refusal")
        assert "403" in error and "agentic agents forget vm-x" in error
        done = cli(sidecar, "forget", "vm-x")
        assert done.returncode == 0 and "forgotten" in done.stdout, done.stderr
        wait_for(lambda: registration(again)["registered"], "registered again once forgotten", 15)
        wait_for(lambda: agents(client).get("vm-x", {}).get("state") == "live", "live again", 15)


def test_a_credential_renews_before_its_lifetime_and_an_outlived_one_bootstraps_again(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """With credential_lifetime_seconds = 6 the agent is asked to renew after 3 s: its identity file and
    fingerprint change, the old credential alone is refused, the sidecar calls it with the new call
    token. Paused past the lifetime, its credential is refused as expired, and it registers again
    with the fleet token, on its own."""
    extra = "credential_lifetime_seconds = 6.0\n"
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow, extra))
        agent = stack.enter_context(registering(tmp_path / "a", sidecar, "vm-n"))
        client = stack.enter_context(sidecar.client())
        wait_for(lambda: "vm-n" in agents(client), "registered")
        first = registration(agent)["identity_fingerprint"]
        old_proof, old_call = agent.credential(), agent.call_token()
        wait_for(lambda: (f := registration(agent)["identity_fingerprint"]) != first and f, "a renewal", 15)
        assert agent.call_token() != old_call and agent.credential() != old_proof
        assert not (agent.home / "identity.next").exists()
        time.sleep(1.5)  # heartbeats go on with the new one
        assert registration(agent)["last_error"] is None
        beat = Heartbeat(url=agent.url, instance="i-old", labels=("pool",)).to_json()
        answer = httpx.put(
            f"{sidecar.url}/agents/vm-n", json=beat, headers={CREDENTIAL_HEADER: old_proof}, timeout=10
        )
        assert answer.status_code == 401, answer.text
        job, pid = running(client, airflow, "renewed", agent)
        stopped_by_airflow(client, airflow, "renewed", job, pid)

        process = psutil.Process(agent.pid)
        process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(7.0)  # past the lifetime of the credential it holds
        finally:
            process.send_signal(signal.SIGCONT)
        paused_until = registration(agent)["last_heartbeat_at"]
        wait_for(
            lambda: (
                (r := registration(agent))["last_heartbeat_at"] > paused_until and r["last_error"] is None
            ),
            "heartbeats taken again",
            15,
        )
        wait_for(lambda: agents(client)["vm-n"]["state"] == "live", "live again", 15)
        log = sidecar.log_path.read_text()
        assert "credential expired" in log and old_proof not in log
