"""Agents that register themselves (ROUTER_URL, AGENT_ID, SELF_URL, the fleet token) and heartbeat.

Real agent processes and a real sidecar process: registration, routing by free capacity, drain,
refusals (an id held by a live agent elsewhere, a wrong token, an address the sidecar cannot reach, an
id configured in ``[[agents]]``), an agent SIGKILLed (lost, its jobs FAILED) and restarted (registers
again, its orphans stopped), and a sidecar paused longer than ``lost_after_seconds`` that declares no
agent lost for the silence it caused itself. The request's parsing is pinned without a network.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from aiohttp import web

from agent_api.protocol import ProtocolError
from agent_api.registration import Heartbeat, parse_heartbeat
from harness.agent import AgentProcess
from harness.processes import free_port, wait_for
from harness.served import ServedAirflow, ServedApp
from harness.sidecar import AgentRef, SidecarProcess

FLEET_TOKEN = "fleet-token-for-tests"
# [leader] lease_seconds must be below lost_after_seconds: one second below leaves a renewal about
# 2 s on a loaded machine (a lease not renewed in time ends the leader's term).
LOST_AFTER = 6.0
FLEET = (
    f"[leader]\nlease_seconds = {LOST_AFTER - 1}\n"
    f"[fleet]\nlost_after_seconds = {LOST_AFTER}\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
)


# ----------------------------------------------------------------------------------- the request


@pytest.mark.fast
def test_a_heartbeat_round_trips_and_bad_ones_name_their_field() -> None:
    beat = Heartbeat(url="http://10.0.0.5:8791", instance="abc-1", labels=("gpu",), max_jobs=4)
    assert parse_heartbeat(beat.to_json()) == beat
    good = beat.to_json()
    bad: list[tuple[dict[str, Any], str]] = [
        ({**good, "url": "ftp://x:1"}, "url"),
        ({**good, "url": "http://user:pw@x:1"}, "credentials"),
        ({**good, "url": "http://x:99999"}, "url"),
        ({**good, "url": "http://stra\u00dfe.example:8791"}, "ASCII"),  # resolvers disagree on IDNA
        ({**good, "instance": "a b"}, "instance"),
        ({**good, "labels": ["ok", 3]}, "label"),
        ({**good, "labels": ["x\u0000"]}, "label"),
        ({**good, "labels": ["l"] * 33}, "labels"),
        ({**good, "max_jobs": -1}, "max_jobs"),
        ({**good, "max_jobs": True}, "max_jobs"),
        ({**good, "draining": "yes"}, "draining"),
        ({**good, "version": "v\n1"}, "version"),
        ({**good, "version": "v\x7f1"}, "version"),  # DEL
        ({**good, "version": "v\x851"}, "version"),  # a C1 control (NEL)
        ({**good, "max_jobs": 2.5}, "max_jobs"),
        ({**good, "jobs": [0]}, "each of jobs must be an object"),
        ({**good, "jobs": [{"job_id": "x"}, "x"]}, "each of jobs must be an object"),
        ({**good, "heartbeat_seconds": float("nan")}, "heartbeat_seconds"),
        ({**good, "heartbeat_seconds": 0}, "heartbeat_seconds"),
    ]
    for body, field in bad:
        with pytest.raises(ProtocolError, match=field):
            parse_heartbeat(body)
    with pytest.raises(ProtocolError, match="JSON object"):
        parse_heartbeat([good])
    assert parse_heartbeat({**good, "zone": "b"}).extra == {"zone": "b"}  # a newer agent's field, kept aside
    # JSON has one number type: a whole float is that integer, as try_number: 1.0 is at POST /jobs.
    whole = parse_heartbeat({**good, "max_jobs": 2.0, "jobs_running": 1.0})
    assert (whole.max_jobs, whole.jobs_running) == (2, 1) and isinstance(whole.max_jobs, int)
    with pytest.raises(ProtocolError, match="jobs"):
        parse_heartbeat({**good, "jobs": [{}] * 501})
    with pytest.raises(ProtocolError, match="cursor"):
        parse_heartbeat({**good, "cursor": "a b"})
    # A job entry the sidecar cannot read (a newer agent's status word) is skipped, not the heartbeat.
    mixed = parse_heartbeat({**good, "jobs": [{"job_id": "x", "status": "PAUSED"}]})
    assert (mixed.jobs, mixed.unreadable_jobs) == ((), 1)


# ------------------------------------------------------------------------------- real processes


def sidecar_for(tmp_path: Path, airflow: ServedAirflow, **kwargs: Any) -> SidecarProcess:
    return SidecarProcess(
        workdir=tmp_path / "sidecar",
        airflow_url=airflow.url,
        airflow_password="unused",
        agents=kwargs.pop("agents", []),
        api_version="v2",
        fleet_token=kwargs.pop("fleet_token", FLEET_TOKEN),
        extra_config=kwargs.pop("extra_config", FLEET),
        **kwargs,
    )


def registering(
    home: Path, sidecar: SidecarProcess, agent_id: str, *, token: str = FLEET_TOKEN, **kwargs: Any
) -> AgentProcess:
    """An agent that registers itself: no token of its own, the fleet's; found by its labels."""
    port = kwargs.pop("port", None) or free_port()
    labels = kwargs.pop("labels", ["pool"])
    self_url = kwargs.pop("self_url", f"http://127.0.0.1:{port}")
    return AgentProcess(
        home,
        agent_id=agent_id,
        port=port,
        token=token,
        accepted_tokens=[],
        extra_config=f"heartbeat_seconds = 0.5\nlabels = {labels!r}\n".replace("'", '"'),
        extra_env={
            "ROUTER_URL": sidecar.url,
            "SELF_URL": self_url,
            "AGENTIC_FLEET_TOKEN": token,
            "AGENTIC_AGENT_TOKEN": "",
        },
        **kwargs,
    )


def agents(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {a["agent_id"]: a for a in client.get("/agents").json()["agents"]}


def registration(agent: AgentProcess) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{agent.url}/healthz", timeout=5).json()["registration"]
    return answer


def submit(client: httpx.Client, task_id: str, command: str = "sleep 60", **route: Any) -> httpx.Response:
    body = {"command": command, "dag_id": "d", "task_id": task_id, "run_id": "r", "try_number": 1}
    return client.post("/jobs", json={**body, **route})


def test_twenty_agents_register_and_jobs_spread_by_free_capacity_and_drain(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """20 agent processes register with one sidecar (no [[agents]] at all); 40 jobs by labels fill them
    two each (max_jobs 2); one drained takes no new job while its running ones go on and finish."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        fleet = [
            stack.enter_context(registering(tmp_path / f"a{n:02}", sidecar, f"vm-{n:02}", max_jobs=2))
            for n in range(20)
        ]
        client = stack.enter_context(sidecar.client())
        listed = wait_for(lambda: len(agents(client)) == 20 and agents(client), "20 registered agents", 30)
        assert {a["state"] for a in listed.values()} == {"live"}
        assert all(
            a["registered"] and a["labels"] == ["pool"] and a["max_jobs"] == 2 for a in listed.values()
        )
        assert all(registration(agent)["registered"] for agent in fleet[:3])

        for n in range(41):
            airflow.call_soon(airflow.standin.add, "d", "r", f"t{n}", -1, "running", 1)
        # Long enough to outlast the 20 submissions below on a loaded machine (their slots stay taken).
        first = [submit(client, f"t{n}", "sleep 30", labels=["pool"]) for n in range(20)]
        placed = [answer.json()["agent_id"] for answer in first]
        assert sorted(placed) == sorted(agent.agent_id for agent in fleet)  # one each: the most free slots
        drained = fleet[19]
        assert client.post("/agents/vm-19/drain").json()["state"] == "draining"
        assert httpx.get(f"{drained.url}/readyz", timeout=5).json()["status"] == "draining"

        second = [submit(client, f"t{20 + n}", labels=["pool"]).json()["agent_id"] for n in range(19)]
        assert sorted(second) == sorted(agent.agent_id for agent in fleet[:19])  # none to vm-19
        refused = submit(client, "t40", labels=["pool"])
        assert refused.status_code == 503
        assert "vm-19 draining" in refused.json()["error"] and "vm-00 full 2/2" in refused.json()["error"]

        job = first[placed.index("vm-19")].json()["job_id"]
        ended = wait_for(
            lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "SUCCEEDED" and j, "end", 45
        )
        assert ended["rc"] == 0  # its running job went on to its end, drained or not
        assert agents(client)["vm-19"]["state"] == "draining"


def test_refused_registrations_say_why_and_change_nothing(tmp_path: Path, airflow: ServedAirflow) -> None:
    """An id held by a live agent elsewhere, a wrong fleet token, an address the sidecar cannot reach
    and an id configured in [[agents]] are refused; the agent says why in /healthz, and runs on."""
    with ExitStack() as stack:
        static = stack.enter_context(AgentProcess(tmp_path / "static", agent_id="static", token="st"))
        sidecar = stack.enter_context(
            sidecar_for(tmp_path, airflow, agents=[AgentRef("static", static.url, "st", labels=["pool"])])
        )
        client = stack.enter_context(sidecar.client())
        first = stack.enter_context(registering(tmp_path / "first", sidecar, "vm-a"))
        wait_for(lambda: "vm-a" in agents(client), "vm-a registered")

        twin = stack.enter_context(registering(tmp_path / "twin", sidecar, "vm-a"))
        error = wait_for(lambda: registration(twin)["last_error"], "the twin's refusal")
        assert "409" in error and "held by the agent registered at " + first.url in error
        assert agents(client)["vm-a"]["url"] == first.url

        wrong = stack.enter_context(
            registering(tmp_path / "wrong", sidecar, "vm-w", token="not-the-fleet-token")
        )
        assert "401" in wait_for(lambda: registration(wrong)["last_error"], "the wrong token's refusal")

        unreachable = f"http://127.0.0.1:{free_port()}"
        lost = stack.enter_context(registering(tmp_path / "nowhere", sidecar, "vm-n", self_url=unreachable))
        error = wait_for(lambda: registration(lost)["last_error"], "the unreachable address's refusal")
        assert "422" in error and unreachable in error

        clash = stack.enter_context(registering(tmp_path / "clash", sidecar, "static"))
        assert "configured in [[agents]]" in wait_for(lambda: registration(clash)["last_error"], "refusal")

        assert set(agents(client)) == {"static", "vm-a"}
        assert not agents(client)["static"]["registered"]
        metrics = client.get("/metrics").text
        assert 'reconciler_agent_heartbeats_total{result="refused"}' in metrics
        assert FLEET_TOKEN not in sidecar.log_path.read_text() + twin.log_text()
        # An operator's token registers nothing; the fleet token submits nothing.
        beat = Heartbeat(url=first.url, instance="x").to_json()
        assert client.put("/agents/vm-z", json=beat).status_code == 401
        with sidecar.client(FLEET_TOKEN) as as_fleet:
            assert as_fleet.post("/jobs", json={}).status_code == 401


def test_a_registration_naming_another_service_learns_nothing_of_it(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """The call-back reaches whatever URL a fleet-token holder names: the 422 says only that the agent
    could not be verified, the same for a service that answers (its page is not quoted) as for a
    closed port; the sidecar's log says what answered."""
    secret_page = "internal-admin-page-" + "s" * 16

    async def forbidden(request: web.Request) -> web.Response:
        return web.Response(status=403, text=secret_page)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forbidden)
    service = ServedApp(app)
    service.start()
    try:
        with sidecar_for(tmp_path, airflow) as sidecar, sidecar.client(FLEET_TOKEN) as fleet:
            errors = []
            for url in (service.url, f"http://127.0.0.1:{free_port()}"):
                beat = Heartbeat(url=url, instance="probe-1").to_json()
                answer = fleet.put("/agents/probe", json=beat)
                assert answer.status_code == 422, answer.text
                errors.append(answer.json()["error"].replace(url, "<url>"))
            assert errors[0] == errors[1] and "could not verify agent probe" in errors[0], errors
            assert secret_page not in errors[0]
            log = sidecar.log_path.read_text()
            assert "403" in log and "Connect" in log  # the operator reads what answered
    finally:
        service.stop()


def test_a_killed_registered_agent_is_lost_and_registers_again_on_restart(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """SIGKILL: no more heartbeats, lost after lost_after_seconds, its job FAILED. Restarted on its home,
    it registers as a new instance and the sweep stops the job it adopted, which the router DB ended."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        agent = stack.enter_context(registering(tmp_path / "vm", sidecar, "vm-k"))
        wait_for(lambda: agents(client).get("vm-k", {}).get("state") == "live", "registered")
        airflow.call_soon(airflow.standin.add, "d", "r", "long", -1, "running", 1)
        job = submit(client, "long", labels=["pool"]).json()["job_id"]
        pid = wait_for(
            lambda: httpx.get(f"{agent.url}/jobs/{job}", headers=calls(agent), timeout=5).json()["pid"],
            "pid",
        )
        os.kill(agent.pid, signal.SIGKILL)
        agent.process.wait(timeout=10)
        wait_for(lambda: agents(client)["vm-k"]["state"] == "lost", "lost", timeout=LOST_AFTER + 10)
        # Its jobs are ended right after the verdict, in the same tick.
        failed = wait_for(
            lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "FAILED" and j, "ended"
        )
        assert "agent vm-k lost" in failed["reason"]
        assert psutil.pid_exists(pid)  # the job's process outlived its agent

        restarted = registering(tmp_path / "vm", sidecar, "vm-k", port=agent.port)
        stack.enter_context(restarted)
        wait_for(lambda: agents(client)["vm-k"]["state"] == "live", "live again")
        wait_for(
            lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", "orphan stopped"
        )
        assert "stopping orphan" in sidecar.log_path.read_text()


def test_a_sidecar_paused_beyond_lost_after_declares_no_agent_lost(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """SIGSTOP the sidecar for twice lost_after_seconds: heartbeats went unheard because of the sidecar
    itself, so after SIGCONT its agents stay live and their jobs run on."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        stack.enter_context(registering(tmp_path / "vm", sidecar, "vm-p"))
        wait_for(lambda: agents(client).get("vm-p", {}).get("state") == "live", "registered")
        airflow.call_soon(airflow.standin.add, "d", "r", "kept", -1, "running", 1)
        job = submit(client, "kept", labels=["pool"]).json()["job_id"]
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "RUNNING", "running")
        assert sidecar.proc is not None
        os.kill(sidecar.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(2 * LOST_AFTER)
        finally:
            os.kill(sidecar.proc.pid, signal.SIGCONT)
        seen = set()
        for _ in range(12):  # a few ticks and heartbeats: suspect a moment at most, never lost
            seen.add(agents(client)["vm-p"]["state"])
            time.sleep(0.25)
        assert "lost" not in seen, seen
        wait_for(lambda: agents(client)["vm-p"]["state"] == "live", "live", timeout=5)
        assert client.get(f"/jobs/{job}").json()["status"] == "RUNNING"


def calls(agent: AgentProcess) -> dict[str, str]:
    """As the sidecar calls a registered agent: with the call token its heartbeats carry."""
    return {"Authorization": f"Bearer {agent.call_token()}"}


def test_a_registered_agent_pushes_an_exit_that_a_long_poll_hears_at_once(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """The heartbeat carries the job's changes as they happen: with the loop's cycle (and its catch-up
    read of the agents) at 30 s, the exit and its rc still reach the router DB, and a long-poll on the
    job, within a second or so of the command's end."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow, interval_seconds=30.0))
        client = stack.enter_context(sidecar.client())
        stack.enter_context(registering(tmp_path / "vm", sidecar, "vm-x"))
        wait_for(lambda: agents(client).get("vm-x", {}).get("state") == "live", "registered")
        airflow.call_soon(airflow.standin.add, "d", "r", "quick", -1, "running", 1)
        job = submit(client, "quick", "sleep 2; exit 3", labels=["pool"]).json()["job_id"]
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "RUNNING", "running", timeout=5)
        asked = time.monotonic()
        answer = client.get(f"/jobs/{job}", params={"wait": 20, "status": "RUNNING"}).json()
        heard_after = time.monotonic() - asked
        assert (answer["status"], answer["rc"]) == ("FAILED", 3)
        assert heard_after < 5.0, heard_after  # the command ran 2 s of it; the next cycle is 30 s away


def test_a_registered_agent_restarted_at_once_keeps_its_jobs(tmp_path: Path, airflow: ServedAirflow) -> None:
    """Restarted within lost_after_seconds (a new instance at the same URL), the agent registers again
    at once, adopts its running job, and that job's end is recorded as usual: nothing was lost."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        first = registering(tmp_path / "vm", sidecar, "vm-r")
        first.start()
        try:
            wait_for(lambda: agents(client).get("vm-r", {}).get("state") == "live", "registered")
            airflow.call_soon(airflow.standin.add, "d", "r", "kept", -1, "running", 1)
            job = submit(client, "kept", "sleep 4; exit 0", labels=["pool"]).json()["job_id"]
            wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "RUNNING", "running")
        finally:
            first.terminate()
        again = stack.enter_context(registering(tmp_path / "vm", sidecar, "vm-r", port=first.port))
        wait_for(lambda: registration(again)["registered"], "registered again")
        assert agents(client)["vm-r"]["state"] == "live"
        ended = wait_for(
            lambda: (j := client.get(f"/jobs/{job}").json())["status"] == "SUCCEEDED" and j, "end", 45
        )
        assert ended["rc"] == 0


def test_a_standby_replica_routes_to_agents_registered_through_another(
    tmp_path: Path, airflow: ServedAirflow, postgres_url: str
) -> None:
    """Two replicas on one router DB: an agent heartbeats to one; the other (whichever leads) knows it
    from the agents table and routes a job there by labels."""
    with ExitStack() as stack:
        first = stack.enter_context(sidecar_for(tmp_path / "a", airflow, db_url=postgres_url))
        second = stack.enter_context(sidecar_for(tmp_path / "b", airflow, db_url=postgres_url))
        stack.enter_context(registering(tmp_path / "vm", first, "vm-s"))
        with second.client() as client:
            wait_for(lambda: "vm-s" in agents(client), "the other replica lists it")
            airflow.call_soon(airflow.standin.add, "d", "r", "routed", -1, "running", 1)
            answer = submit(client, "routed", "true", labels=["pool"])
            assert answer.status_code == 201, answer.text
            assert answer.json()["agent_id"] == "vm-s"


def test_a_planned_shutdown_keeps_heartbeating_while_it_drains_then_leaves(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """SIGTERM with drain_on_shutdown_seconds beyond lost_after_seconds: the agent keeps heartbeating
    (draining) while its job runs to its end, so it is never lost and the job SUCCEEDS; then it says
    it leaves, and the sidecar forgets it."""
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        client = stack.enter_context(sidecar.client())
        agent = registering(tmp_path / "vm", sidecar, "vm-d", drain_on_shutdown_seconds=3 * LOST_AFTER)
        stack.enter_context(agent)
        wait_for(lambda: agents(client).get("vm-d", {}).get("state") == "live", "registered")
        airflow.call_soon(airflow.standin.add, "d", "r", "last", -1, "running", 1)
        job = submit(client, "last", f"sleep {LOST_AFTER + 3}; exit 0", labels=["pool"]).json()["job_id"]
        wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "RUNNING", "running")
        agent.process.send_signal(signal.SIGTERM)
        wait_for(lambda: agents(client)["vm-d"]["state"] == "draining", "draining heard", timeout=5)
        states = set()
        while agent.process.poll() is None:
            states.add(agents(client).get("vm-d", {}).get("state", "gone"))
            time.sleep(0.5)
        assert "lost" not in states
        assert client.get(f"/jobs/{job}").json()["status"] == "SUCCEEDED"
        wait_for(lambda: "vm-d" not in agents(client), "forgotten once it left", timeout=5)
