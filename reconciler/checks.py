"""``python -m reconciler check-config --connect``: reach everything the sidecar needs, with the
configured credentials, before a rollout finds out. Each check names what it reached, never a secret.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import make_url

from agent_api.client import AgentClient, AgentError, AgentRejected, JobNotFound
from reconciler.airflow import AirflowClient, AirflowError
from reconciler.config import AgentEntry, ReconcilerConfig, Secrets
from router_db import RouterDB, schema

TIMEOUT_SECONDS = 10.0
NO_SUCH_JOB = "0" * 32  # asked of each agent: "not found" proves the token was accepted


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


async def connections(config: ReconcilerConfig, secrets: Secrets) -> list[Check]:
    """Airflow (an authenticated read), the router DB (a query, its schema revision) and every
    configured agent (its health answer names the id configured, an authenticated read)."""
    checks = [
        await _airflow(config, secrets),
        await asyncio.to_thread(
            _router_db, config.router_db.url, upgrade_on_start=config.router_db.upgrade_on_start
        ),
    ]
    for entry in config.agents:
        checks.append(await _agent(entry, secrets.agent_tokens[entry.id].current()))
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


def _router_db(url: str, *, upgrade_on_start: bool) -> Check:
    what = f"router DB {make_url(url).render_as_string(hide_password=True)}"
    db = RouterDB(url)
    try:
        db.ping()
        found, head = schema.state(db.engine), schema.head()
        verdict = schema.verdict(found, head=head, known=schema.known_revisions())
    except Exception as exc:  # whatever the driver raises; its text may hold the URL: the type only
        return Check(what, False, f"cannot connect or query: {type(exc).__name__}")
    finally:
        db.dispose()
    if verdict is schema.Verdict.CURRENT:
        return Check(what, True, f"schema at revision {head}")
    if verdict is schema.Verdict.EMPTY:
        return Check(what, True, f"empty: the schema at revision {head} is created at start")
    refused = schema.SchemaRefused(found, head, verdict)
    if upgrade_on_start and verdict is not schema.Verdict.NEWER:
        return Check(what, True, f"{refused}: upgraded at start ([router_db] upgrade_on_start)")
    return Check(what, False, f"{refused}: the sidecar refuses to start; run python -m reconciler db upgrade")


async def _agent(entry: AgentEntry, token: str) -> Check:
    what = f"agent {entry.id} at {entry.url}"
    try:
        client = AgentClient(entry.url, token, timeout=TIMEOUT_SECONDS, ca_file=entry.ca_file or None)
    except ValueError as exc:  # a CA file that cannot be loaded
        return Check(what, False, str(exc))
    async with client:
        try:
            reported = (await client.health()).get("agent_id")
            if reported != entry.id:
                return Check(what, False, f"the agent there calls itself {reported!r}")
            await client.get(NO_SUCH_JOB)
        except JobNotFound:
            return Check(what, True, "answers, and takes this sidecar's token")
        except AgentRejected as exc:
            return Check(what, False, f"refused this sidecar's token ({exc})")
        except AgentError as exc:
            return Check(what, False, str(exc))
    return Check(what, False, f"knows a job {NO_SUCH_JOB}: is this an agent?")
