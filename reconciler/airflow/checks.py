"""``python -m reconciler check-config --connect``: reach everything the sidecar needs, with the
configured credentials, before a rollout finds out. Each check names what it reached, never a secret.

Agents come from two places, as the sidecar's fleet has them: ``[[agents]]`` (with their tokens) and
the router DB's ``agents`` table (those that registered themselves, called with the call token their
heartbeats carry, or the fleet token for an agent older than credentials, and
``[fleet] registration_ca_file``). When the registered ones cannot be read or called, a line says so.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import make_url

from agent_api.client import AgentClient, AgentError, AgentRejected, JobNotFound
from reconciler.airflow.client import AirflowClient
from reconciler.airflow.task_instances import AirflowError
from reconciler.config import ReconcilerConfig, Secrets
from router_db import AgentRecord, RouterDB, schema

TIMEOUT_SECONDS = 10.0
NO_SUCH_JOB = "0" * 32  # asked of each agent: "not found" proves the token was accepted
NAMED_AT_MOST = 5  # agent ids a summary line names
AT_ONCE = 50  # registered agents tried at once (each try holds two connections)


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


async def connections(config: ReconcilerConfig, secrets: Secrets) -> list[Check]:
    """Airflow (an authenticated read), the router DB (a query, its schema revision), every
    configured agent and every registered one (its health answer names its id, an authenticated read)."""
    router_db, verdict = await asyncio.to_thread(
        _router_db, config.router_db.url, upgrade_on_start=config.router_db.upgrade_on_start
    )
    checks = [await _airflow(config, secrets), router_db]
    for entry in config.agents:
        checks.append(
            await _agent(
                f"agent {entry.id} at {entry.url}",
                entry.id,
                entry.url,
                secrets.agent_tokens[entry.id].current(),
                ca_file=entry.ca_file,
                whose="this sidecar's",
            )
        )
    checks += await _registered(config, secrets, verdict)
    return checks


async def _airflow(config: ReconcilerConfig, secrets: Secrets) -> Check:
    what = f"Airflow at {config.airflow.base_url}"
    client = AirflowClient(
        config.airflow.base_url,
        api_version=config.airflow.api_version,  # type: ignore[arg-type]  # validated by the config
        username=config.airflow.username,
        password=secrets.airflow_password,
        timeout=TIMEOUT_SECONDS,
    )
    try:
        await client.ping()
        return Check(
            what, True, f"REST API {await client.api_version()}, user {config.airflow.username!r} may read"
        )
    except AirflowError as exc:
        return Check(what, False, str(exc))
    finally:
        await client.close()


def _router_db(url: str, *, upgrade_on_start: bool) -> tuple[Check, schema.Verdict | None]:
    """The router DB's check, and its schema's verdict (None: it could not be read)."""
    what = f"router DB {make_url(url).render_as_string(hide_password=True)}"
    db = RouterDB(url)
    try:
        db.ping()
        found, head = schema.state(db.engine), schema.head()
        verdict = schema.verdict(found, head=head, known=schema.known_revisions())
    except Exception as exc:  # whatever the driver raises; its text may hold the URL: the type only
        return Check(what, False, f"cannot connect or query: {type(exc).__name__}"), None
    finally:
        db.dispose()
    if verdict is schema.Verdict.CURRENT:
        return Check(what, True, f"schema at revision {head}"), verdict
    if verdict is schema.Verdict.EMPTY:
        return Check(what, True, f"empty: the schema at revision {head} is created at start"), verdict
    refused = schema.SchemaRefused(found, head, verdict)
    if upgrade_on_start and verdict is not schema.Verdict.NEWER:
        return Check(what, True, f"{refused}: upgraded at start ([router_db] upgrade_on_start)"), verdict
    return (
        Check(what, False, f"{refused}: the sidecar refuses to start; run python -m reconciler db upgrade"),
        verdict,
    )


def _registered_agents(url: str) -> list[AgentRecord]:
    db = RouterDB(url)
    try:
        return db.registered_agents()
    finally:
        db.dispose()


async def _registered(
    config: ReconcilerConfig, secrets: Secrets, verdict: schema.Verdict | None
) -> list[Check]:
    """Each registered agent as the sidecar calls it; one line instead when they cannot be tried."""
    what = "registered agents"
    if verdict is None:
        return [Check(what, False, "not checked: the router DB, where they are kept, cannot be read")]
    if verdict is schema.Verdict.EMPTY:
        return [Check(what, True, "none: the router DB is empty")] if secrets.fleet_tokens else []
    try:
        rows = await asyncio.to_thread(_registered_agents, config.router_db.url)
    except Exception as exc:  # e.g. a schema older than the agents table; the type only, as above
        return [
            Check(
                what,
                False,
                f"not checked: the router DB's agents table cannot be read ({type(exc).__name__})",
            )
        ]
    # An id also in [[agents]] is the configured agent's (the sidecar leaves such a row unused).
    configured = {entry.id for entry in config.agents}
    rows = [row for row in rows if row.agent_id not in configured]
    tokens = secrets.fleet_tokens
    # Without a fleet token only agents with call tokens of their own are called (by the sidecar too):
    # one older than credentials would need the fleet token.
    older = [row for row in rows if not row.call_token] if tokens is None else []
    rows = [row for row in rows if row not in older]
    checks: list[Check] = []
    if older:
        ids = ", ".join(row.agent_id for row in older[:NAMED_AT_MOST]) + (
            ", ..." if len(older) > NAMED_AT_MOST else ""
        )
        fleet = config.fleet
        checks.append(
            Check(
                what,
                False,
                f"{len(older)} in the router DB ({ids}), not checked: agents older than credentials are "
                f"called with the fleet token, and this sidecar has none (set {fleet.registration_token_env} "
                "or [fleet] registration_token_file)",
            )
        )
    if not rows:
        return checks if tokens is None else [Check(what, True, "none in the router DB")]
    token = tokens.current()[0] if tokens is not None else ""  # sent to agents older than credentials
    # A bounded fan-out: each try opens two clients, and a fleet of a thousand would exhaust the
    # process's file descriptors at once.
    room = asyncio.Semaphore(AT_ONCE)

    async def tried(row: AgentRecord) -> Check:
        async with room:
            check = await _agent(
                f"registered agent {row.agent_id} at {row.url}",
                row.agent_id,
                row.url,
                row.call_token or token,
                ca_file=config.fleet.registration_ca_file,
                whose="its registration's" if row.call_token else "the fleet",
            )
        if check.ok:
            return check
        # A VM gone since: its last heartbeat tells that apart from a wrong token or CA.
        ago = (datetime.now(UTC) - row.last_heartbeat_at).total_seconds()
        heard = row.last_heartbeat_at.isoformat(timespec="seconds")
        return Check(check.what, False, f"{check.detail}; last heartbeat {heard}, {ago:.0f} s ago")

    # Many at once: an autoscaled fleet may hold many, and each silent one waits out the timeout.
    return checks + list(await asyncio.gather(*(tried(row) for row in rows)))


async def _agent(what: str, agent_id: str, url: str, token: str, *, ca_file: str, whose: str) -> Check:
    """``whose`` token it is, for the line: ``this sidecar's`` or ``the fleet``."""
    try:
        # Who answers is asked without the token, as the sidecar's registry does: an address that is
        # not that agent's must not receive it.
        anonymous = AgentClient(url, "", timeout=TIMEOUT_SECONDS, ca_file=ca_file or None)
        client = AgentClient(url, token, timeout=TIMEOUT_SECONDS, ca_file=ca_file or None)
    except ValueError as exc:  # a CA file that cannot be loaded
        return Check(what, False, str(exc))
    async with anonymous, client:
        try:
            reported = (await anonymous.health()).get("agent_id")
            if reported != agent_id:
                return Check(what, False, f"the agent there calls itself {reported!r}")
            await client.get(NO_SUCH_JOB)
        except JobNotFound:
            return Check(what, True, f"answers, and takes {whose} token")
        except AgentRejected as exc:
            return Check(what, False, f"refused {whose} token ({exc})")
        except AgentError as exc:
            return Check(what, False, str(exc))
    return Check(what, False, f"knows a job {NO_SUCH_JOB}: is this an agent?")
