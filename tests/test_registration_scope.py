"""What a registration may claim, held by [fleet] (reconciler/fleet/scope.py), against real processes over
HTTP only: a sidecar with a scope, a real agent registering within it, and hand-made registrations
(a fleet-token holder's) claiming a label, an id or an address outside it, beyond max_agents, or too
many at once. Each is refused with a status and a message naming the key, counted, and changes
nothing: no job routed by the stolen label reaches the claimant."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from agent_api.registration import Heartbeat
from harness.agent import AgentProcess
from harness.processes import wait_for
from harness.served import ServedAirflow, ServedApp
from harness.sidecar import SidecarProcess
from reconciler.fleet.scope import Scope, parse_networks
from tests.test_registration import FLEET_TOKEN, agents, registering, submit
from tests.test_registration import sidecar_for as registration_sidecar

SCOPE = (
    "[fleet]\nlost_after_seconds = 6.0\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
    'registration_ids = ["vm-*"]\nregistration_labels = ["pool", "cpu-*"]\nmax_agents = 2\n'
    "registration_rate_per_second = 0.6\n"  # a burst of 3 (five seconds' worth), then 429
    "[leader]\nlease_seconds = 5.0\n"
)


def sidecar_for(tmp_path: Path, airflow: ServedAirflow, extra: str = SCOPE) -> SidecarProcess:
    return registration_sidecar(tmp_path, airflow, extra_config=extra)


class Impostor(ServedApp):
    """Answers the call-back as ``agent_id`` would: what a fleet-token holder can stand up. ``calls``
    counts the requests it got."""

    def __init__(self, agent_id: str) -> None:
        self.calls = 0

        async def health(request: web.Request) -> web.Response:
            self.calls += 1
            return web.json_response({"status": "ok", "agent_id": agent_id})

        async def jobs(request: web.Request) -> web.Response:
            self.calls += 1
            return web.json_response({"jobs": []})

        app = web.Application()
        app.router.add_get("/healthz", health)
        app.router.add_get("/health", health)
        app.router.add_get("/jobs", jobs)
        super().__init__(app)


def impostor(agent_id: str) -> Impostor:
    served = Impostor(agent_id)
    served.start()
    return served


def out_of_scope(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('reconciler_agent_heartbeats_total{result="out_of_scope"}'):
            return float(line.split()[1])
    return 0.0


def test_claims_outside_the_scope_are_refused_and_change_nothing(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    fake = impostor("vm-fake")
    try:
        with (
            sidecar_for(tmp_path, airflow) as sidecar,
            sidecar.client() as client,
            sidecar.client(FLEET_TOKEN) as fleet,
            registering(tmp_path / "vm", sidecar, "vm-1", labels=["pool"]) as real,
        ):
            wait_for(lambda: agents(client).get("vm-1", {}).get("state") == "live", "vm-1 registered")

            def claim(agent_id: str, labels: list[str], url: str = fake.url) -> httpx.Response:
                beat = Heartbeat(url=url, instance=f"{agent_id}-1", labels=tuple(labels))
                return fleet.put(f"/agents/{agent_id}", json=beat.to_json())

            label = claim("vm-fake", ["pool", "gpu"])
            assert label.status_code == 403 and "'gpu'" in label.json()["error"], label.text
            assert "registration_labels" in label.json()["error"]
            named = claim("db-1", ["pool"])
            assert named.status_code == 403 and "registration_ids" in named.json()["error"], named.text
            assert out_of_scope(client) == 2

            # Within the scope, one more agent fits (max_agents = 2); a third id does not.
            assert claim("vm-fake", ["cpu-large"]).status_code in (200, 201)
            third = claim("vm-third", ["pool"])
            assert third.status_code == 403 and "max_agents" in third.json()["error"], third.text
            assert set(agents(client)) == {"vm-1", "vm-fake"}

            # A job routed by "gpu" finds no agent: the claim above took nothing.
            airflow.call_soon(airflow.standin.add, "d", "r", "gpu-task", -1, "running", 1)
            assert submit(client, "gpu-task", labels=["gpu"]).status_code == 400
            # New processes are called back at most registration_rate_per_second (burst used above).
            again = claim("vm-fake", ["pool"], url=fake.url)  # same process: no call-back, no limit
            assert again.status_code == 200, again.text
            rushed = [
                fleet.put("/agents/vm-fake", json=Heartbeat(url=fake.url, instance=f"new-{i}").to_json())
                for i in range(6)
            ]
            limited = [r for r in rushed if r.status_code == 429]
            assert limited and limited[0].headers.get("Retry-After"), [r.status_code for r in rushed]
            assert real.process.poll() is None and agents(client)["vm-1"]["state"] == "live"
    finally:
        fake.stop()


def test_https_only_and_allowed_networks_refuse_an_address_before_calling_it(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    fake = impostor("vm-fake")
    try:
        extra = (
            "[fleet]\nlost_after_seconds = 6.0\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
            'allowed_networks = ["10.0.0.0/8"]\n[leader]\nlease_seconds = 5.0\n'
        )
        with (
            sidecar_for(tmp_path / "networks", airflow, extra) as sidecar,
            sidecar.client(FLEET_TOKEN) as fleet,
        ):
            answer = fleet.put("/agents/vm-fake", json=Heartbeat(url=fake.url, instance="i-1").to_json())
            assert (
                answer.status_code == 403
                and "does not resolve within [fleet] allowed_networks" in answer.json()["error"]
            )
        https = extra.replace('allowed_networks = ["10.0.0.0/8"]', "require_https = true")
        with sidecar_for(tmp_path / "https", airflow, https) as sidecar, sidecar.client(FLEET_TOKEN) as fleet:
            answer = fleet.put("/agents/vm-fake", json=Heartbeat(url=fake.url, instance="i-1").to_json())
            assert answer.status_code == 403 and "require_https" in answer.json()["error"], answer.text
        assert fake.calls == 0  # refused before any call-back
    finally:
        fake.stop()


@pytest.mark.fast
def test_the_scope_decides_by_pattern_address_and_count() -> None:
    scope = Scope(
        ids=("vm-*",), labels=("pool", "gpu-?"), networks=parse_networks(["10.0.0.0/8", "fd00::/8"])
    )
    assert scope.claim_problem("vm-1", ["pool", "gpu-a"], "http://x") is None
    assert "registration_ids" in str(scope.claim_problem("db-1", [], "http://x"))
    assert "'gpu-ab'" in str(scope.claim_problem("vm-1", ["gpu-ab"], "http://x"))
    assert "require_https" in str(Scope(require_https=True).claim_problem("a", [], "http://x"))
    assert Scope(require_https=True).claim_problem("a", [], "https://x") is None
    assert scope.address_problem("h", ["10.1.2.3", "fd00::1"]) is None
    assert "127.0.0.1" in str(scope.address_problem("h", ["10.1.2.3", "127.0.0.1"]))  # every address
    assert "no address" in str(scope.address_problem("h", []))
    assert Scope().address_problem("h", ["127.0.0.1"]) is None  # no networks: any
    assert Scope(max_agents=2).full(2, new=True) and not Scope(max_agents=2).full(2, new=False)
    assert Scope().full(10_000, new=True) is None
    with pytest.raises(ValueError, match="not a network"):
        parse_networks(["10.0.0.0/33"])


def test_a_restarted_sidecar_verifies_its_known_fleet_without_the_rate_limit(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    """The limit is on new processes: after a restart every agent is called back again, and none of
    them may be held back (a large fleet would otherwise be refused past lost_after_seconds). Two agents
    register freely; the sidecar restarts with one new process allowed per ten seconds: both go on."""
    fleet = "[fleet]\nlost_after_seconds = 6.0\ncheck_interval_seconds = 0.2\ncheck_timeout_seconds = 1.0\n"
    sidecar = sidecar_for(
        tmp_path, airflow, fleet + "registration_rate_per_second = 0\n[leader]\nlease_seconds = 5.0\n"
    )
    with (
        sidecar,
        registering(tmp_path / "a", sidecar, "vm-a") as first,
        registering(tmp_path / "b", sidecar, "vm-b") as second,
    ):
        with sidecar.client() as client:
            wait_for(
                lambda: (
                    {a.get("state") for a in agents(client).values()} == {"live"} and len(agents(client)) == 2
                ),
                "registered",
            )
        sidecar.stop()
        sidecar.extra_config = fleet + "registration_rate_per_second = 0.1\n[leader]\nlease_seconds = 5.0\n"
        sidecar.start()  # the same router DB: both are known there
        restarted = datetime.now(UTC)
        for agent in (first, second):
            wait_for(
                lambda agent=agent: accepted_since(agent, restarted),
                f"{agent.agent_id} heard again",
                timeout=5,
            )
        assert "too many agent registrations" not in sidecar.log_path.read_text()


def accepted_since(agent: AgentProcess, moment: datetime) -> bool:
    shown = httpx.get(f"{agent.url}/healthz", timeout=5).json()["registration"]
    last = shown["last_heartbeat_at"]
    return bool(last) and datetime.fromisoformat(last) > moment and not shown["last_error"]
