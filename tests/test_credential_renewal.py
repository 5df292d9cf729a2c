"""A registered agent's credential renewed, expired, replayed and stolen, judged by the registry (in
process, against a real router DB and a stand-in agent answering the call-back).

A restart half-way through a renewal (the sidecar took it, the agent never heard) is taken as the
renewal it is, not refused as another identity; a stolen credential cannot renew itself into a thief's
secret (the agent's own /healthz does not show it) nor move the registration by replaying the agent's
instance from another address; an expired credential is refused alone, taken with the fleet token
without growing younger, and renewed under the fleet token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.identity import Credentials, load_identity
from agent_api.registration import Heartbeat, identity_fingerprint
from reconciler.api.statuses import status_of
from reconciler.config import FleetConfig
from reconciler.errors import Refused
from reconciler.fleet.registry import Accepted, Registry
from reconciler.metrics import Metrics
from router_db import RouterDB
from servicekit.credentials import Secret

pytestmark = pytest.mark.fast

P1, P2, THIEF = "1" * 64, "2" * 64, "7" * 64
CALL1, CALL2 = "a" * 64, "b" * 64


def stand_in(shown: dict[str, Any]) -> web.Application:
    """An agent as the call-back sees it: its /health shows ``shown`` (changed by the test)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "agent_id": "vm-c", "registration": dict(shown)})

    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": []})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/jobs", jobs)
    return app


def scenario(
    db: RouterDB, shown: dict[str, Any], lifetime: float, steps: Callable[[Registry, str], Awaitable[None]]
) -> None:
    async def main() -> None:
        server = TestServer(stand_in(shown), host="127.0.0.1")
        await server.start_server()
        config = FleetConfig(lost_after_seconds=6.0, credential_lifetime_seconds=lifetime)
        registry = Registry(db=db, token=Secret("fleet"), static_ids=(), config=config, metrics=Metrics())
        try:
            await steps(registry, str(server.make_url("")).rstrip("/"))
        finally:
            await registry.close()
            await server.close()

    asyncio.run(main())


def heartbeat(url: str, instance: str, **secrets: str) -> Heartbeat:
    return Heartbeat(url=url, instance=instance, labels=("pool",), **secrets)


async def refused(status: int, attempt: Awaitable[Accepted]) -> str:
    with pytest.raises(Refused) as caught:
        await attempt
    assert status_of(caught.value) == status, caught.value
    return str(caught.value)


def test_a_restart_half_way_through_a_renewal_is_taken_as_that_renewal(db: RouterDB) -> None:
    shown: dict[str, Any] = {"instance": "i-1", "identity_fingerprint": identity_fingerprint(P1)}

    async def steps(registry: Registry, url: str) -> None:
        await registry.heartbeat("vm-c", heartbeat(url, "i-1", call_token=CALL1), credential=P1)
        shown["next_identity_fingerprint"] = identity_fingerprint(P2)
        renewing = heartbeat(url, "i-1", call_token=CALL1, next_identity_proof=P2, next_call_token=CALL2)
        taken = await registry.heartbeat("vm-c", renewing, credential=P1, bootstrap=False)
        assert taken.credential_renewed and taken.record.call_token == CALL2
        # The answer was lost and the agent restarted: identity still P1, identity.next P2. Its first
        # heartbeat carries the fleet token, the old credential and the renewal.
        shown.update(instance="i-2")
        restarted = heartbeat(url, "i-2", call_token=CALL1, next_identity_proof=P2, next_call_token=CALL2)
        again = await registry.heartbeat("vm-c", restarted, credential=P1, bootstrap=True)
        assert again.credential_renewed and again.record.identity_fingerprint == identity_fingerprint(P2)
        assert again.record.instance == "i-2"

    scenario(db, shown, 0.0, steps)


def test_a_stolen_credential_neither_renews_to_a_thiefs_secret_nor_moves_the_agent(db: RouterDB) -> None:
    shown: dict[str, Any] = {"instance": "i-1", "identity_fingerprint": identity_fingerprint(P1)}

    async def steps(registry: Registry, url: str) -> None:
        await registry.heartbeat("vm-c", heartbeat(url, "i-1", call_token=CALL1), credential=P1)
        stolen = heartbeat(url, "i-1", call_token=CALL1, next_identity_proof=THIEF, next_call_token=CALL2)
        said = await refused(422, registry.heartbeat("vm-c", stolen, credential=P1, bootstrap=False))
        assert THIEF not in said and P1 not in said
        # The agent's public instance, replayed from the thief's own address with the credential.
        elsewhere = heartbeat("http://127.0.0.1:9", "i-1", call_token=CALL2)
        said = await refused(409, registry.heartbeat("vm-c", elsewhere, credential=P1, bootstrap=False))
        assert "keeps its address" in said

    scenario(db, shown, 0.0, steps)
    row = db.registered_agent("vm-c")
    assert row is not None and (row.identity_fingerprint, row.call_token) == (identity_fingerprint(P1), CALL1)
    assert row.url.startswith("http://127.0.0.1:") and not row.url.endswith(":9")


def test_an_expired_credential_is_renewed_under_the_fleet_token_not_issued_again(db: RouterDB) -> None:
    shown: dict[str, Any] = {"instance": "i-1", "identity_fingerprint": identity_fingerprint(P1)}

    async def steps(registry: Registry, url: str) -> None:
        first = await registry.heartbeat("vm-c", heartbeat(url, "i-1", call_token=CALL1), credential=P1)
        time.sleep(1.2)  # past the 1 s lifetime
        said = await refused(
            401, registry.heartbeat("vm-c", heartbeat(url, "i-1"), credential=P1, bootstrap=False)
        )
        assert "expired" in said
        # With the fleet token: taken, no younger, and asked to renew.
        again = await registry.heartbeat("vm-c", heartbeat(url, "i-1", call_token=CALL1), credential=P1)
        assert again.renew_credential
        assert again.record.credential_issued_at == first.record.credential_issued_at
        shown["next_identity_fingerprint"] = identity_fingerprint(P2)
        renewing = heartbeat(url, "i-1", call_token=CALL1, next_identity_proof=P2, next_call_token=CALL2)
        renewed = await registry.heartbeat("vm-c", renewing, credential=P1, bootstrap=True)
        assert renewed.credential_renewed and not renewed.renew_credential
        shown.update(identity_fingerprint=identity_fingerprint(P2), next_identity_fingerprint=None)
        beat = await registry.heartbeat(
            "vm-c", heartbeat(url, "i-1", call_token=CALL2), credential=P2, bootstrap=False
        )
        assert beat.record.identity_fingerprint == identity_fingerprint(P2)

    scenario(db, shown, 1.0, steps)


def test_the_agents_renewal_on_disk_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    """identity.next is written before it is sent; an agent restarted before the answer goes on with
    it; moving it over identity is done once; a renewal the sidecar did not take is dropped."""
    home = tmp_path / "home"
    first = Credentials(home, "vm-c", load_identity(home, "i-1"), clock=time.monotonic)
    old = first.current.proof("vm-c")
    first.renew()
    pending = first.next
    assert pending is not None and (home / "identity.next").exists()
    assert set(first.call_tokens()) == {first.current.call_token("vm-c"), pending.call_token("vm-c")}
    # Killed here: the next start finds the renewal under way.
    second = Credentials(home, "vm-c", load_identity(home, "i-2"), clock=time.monotonic)
    assert second.next is not None and second.next.proof("vm-c") == pending.proof("vm-c")
    second.renewed()
    second.renewed()  # an answer seen twice: nothing more happens
    assert second.current.proof("vm-c") == pending.proof("vm-c") != old
    assert not (home / "identity.next").exists()
    assert load_identity(home, "i-3").proof("vm-c") == pending.proof("vm-c")
    assert first.current.call_token("vm-c") in second.call_tokens()  # the old one, for a while
    second.renew()
    second.abandon()
    assert second.next is None and not (home / "identity.next").exists()
