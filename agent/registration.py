"""Registration with the sidecar: one ``PUT /agents/{id}`` at start, then one per heartbeat.

With ``router_url`` set, the agent tells that sidecar where it is (``self_url``), what it carries
(``labels``), how much it takes (``max_jobs``, ``jobs_running``, ``draining``) and which process it is
(``instance``, new at each start), every ``heartbeat_seconds`` and at once when its drain flag
changes. The sidecar derives the agent's liveness from these heartbeats.

Each heartbeat carries the agent's credential (:mod:`agent.identity`): a proof derived from the secret
in its home, and the instances that home ran before. The first heartbeat of a process also carries the
fleet token (the first of ``[agent] router token``): a bootstrap token, which registers the id when
it is new or its holder is lost. Once accepted, the agent speaks with its credential alone: a
fleet-token holder cannot speak for it, and the fleet token may be rotated without it. A credential
the sidecar no longer knows (the registration forgotten, or expired) is answered 401: the next
heartbeat bootstraps again with the fleet token. Restarted at another URL on the same home, the
agent's registration moves there at once and keeps its jobs; ``/healthz`` shows the proof's
fingerprint and the instance, which the sidecar's call-back checks against the heartbeat. The sidecar
calls the agent with a token derived from the same secret (``call_token``), never the fleet token.
When the sidecar asks, the credential is renewed (:class:`agent.identity.Credentials`).

The credential, the call token and the fleet token are bearer secrets: sent over plain http to a host
that is not this machine, they cross the network in clear text (the agent says so once in its log:
use https). No registration request follows a redirect: it would carry them to whatever address the
answer names; a redirect is a refusal (set ``router_url`` to the sidecar's own address).

A heartbeat also carries the jobs that changed since the last one the sidecar accepted (started,
exited with their rc, stopped), and is sent as soon as one changes: the sidecar hears of an exit within
a fraction of a second, without asking. Until the sidecar accepts a heartbeat, its changes are sent
again with the next (recording them twice changes nothing); the sidecar's own catch-up read of
``GET /jobs?changed_since=`` covers whatever was never pushed (those before the first heartbeat, a
burst beyond one heartbeat's share).

Nothing here may hold the agent up: a sidecar that is down, slow or refusing is retried in the
background (sooner after a transient failure, at the heartbeat period after a refusal) while jobs
run, stop and answer as ever. A refusal (an id held by a live agent elsewhere, a ``self_url`` the
sidecar cannot reach, a wrong token) is logged as an error once per distinct message and shown in
``/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from agent.config import AgentConfig
from agent.fence import Fence
from agent.identity import Credentials, load_identity
from agent_api.maintenance import Maintenance, Unwell
from agent_api.protocol import JobInfo
from agent_api.registration import CREDENTIAL_HEADER, MAX_PUSHED_JOBS, Heartbeat, identity_fingerprint
from servicekit.credentials import Secret

log = logging.getLogger("agent.registration")

REQUEST_TIMEOUT_SECONDS = 10.0
FIRST_RETRY_SECONDS = 0.5  # after a transient failure: doubled up to the heartbeat period
TRANSIENT = frozenset({408, 425, 429, 500, 502, 503, 504})
GATHER_SECONDS = 0.05  # after a job changes: others changing at once go in the same heartbeat


class JobFeed(Protocol):
    """The agent's job changes (:class:`agent.jobs.JobManager`)."""

    def changes_since(self, cursor: str | None) -> tuple[list[JobInfo], str, bool]: ...

    async def wait_for_change(self, cursor: str | None, timeout: float) -> bool: ...

    async def mark_delivered(self, jobs: Iterable[JobInfo]) -> None: ...


class Refused(Exception):
    """The sidecar answered and said no: retrying at once would get the same answer."""


@dataclass(frozen=True)
class Work:
    """What the agent says of its work in a heartbeat, read at each one."""

    max_jobs: int
    jobs_running: int
    draining: bool
    maintenance: Maintenance | None = None
    unwell: Unwell | None = None


class Registration:
    def __init__(
        self,
        config: AgentConfig,
        *,
        token: Secret[tuple[str, ...]],
        work: Callable[[], Work],
        version: str,
        feed: JobFeed | None = None,
    ) -> None:
        self._config = config
        self._token = token
        self._work = work
        self._version = version
        self.instance = str(uuid.uuid4())
        self.url = config.reachable_url()
        # Read (or made) before the first heartbeat, which must already name this instance's history.
        identity = load_identity(config.home, self.instance)
        # Secrets: never logged, never in /healthz.
        self.credentials = Credentials(config.home, config.id, identity, clock=time.monotonic)
        self._previous_instances = identity.previous_instances
        self._bootstrap = True  # the next heartbeat carries the fleet token too
        if not proof_may_travel(config.router_url):
            log.warning(
                "router_url %s is plain http to a host that is not this machine: the fleet token and "
                "this agent's credential cross the network in clear text, where anyone who reads them "
                "can speak for this agent. Use https for router_url",
                config.router_url,
                extra={"action": "credential_in_clear_text"},
            )
        self.registered = False  # the last heartbeat was accepted
        self.last_heartbeat_at: datetime | None = None  # of the last accepted one
        self.fence: Fence | None = None  # told of each accepted heartbeat, as of its sending
        self.last_error = ""
        self._poke = asyncio.Event()
        self._feed = feed
        self._cursor: str | None = None  # the changes up to here reached the sidecar

    @property
    def fingerprint(self) -> str:
        """The current credential's fingerprint, which ``/healthz`` shows."""
        return identity_fingerprint(self.credentials.current.proof(self._config.id))

    def poke(self) -> None:
        """Send a heartbeat now (the drain flag changed), not at the next period."""
        self._poke.set()

    def status(self) -> dict[str, object]:
        """For ``/healthz``: where it registers and how that goes (never a token)."""
        return {
            "router_url": self._config.router_url,
            "self_url": self.url,
            # The sidecar's call-back checks these against the heartbeat it is verifying.
            "instance": self.instance,
            "identity_fingerprint": self.fingerprint,
            # A renewal under way: the sidecar checks the agent here shows the credential it renews to.
            "next_identity_fingerprint": identity_fingerprint(self.credentials.next.proof(self._config.id))
            if self.credentials.next is not None
            else None,
            "registered": self.registered,
            "last_heartbeat_at": self.last_heartbeat_at.isoformat() if self.last_heartbeat_at else None,
            "last_error": self.last_error or None,
        }

    async def run(self, stopping: asyncio.Event) -> None:
        """Heartbeat until ``stopping`` is set, then send a last one that says the agent leaves.

        ``stopping`` is set once the agent no longer serves (after a drain on shutdown, not at the
        SIGTERM): until then the sidecar must keep hearing that it lives, and of its jobs' ends."""
        connector = aiohttp.TCPConnector(ssl=self._ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            retry = FIRST_RETRY_SECONDS
            while not stopping.is_set():
                self._poke.clear()
                ok = False
                try:
                    await self.beat(session)
                    ok = True
                except Refused as exc:
                    self._failed(str(exc), refused=True)
                    delay = self._config.heartbeat_seconds
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    self._failed(_describe(exc), refused=False)
                    delay, retry = retry, min(2 * retry, self._config.heartbeat_seconds)
                if ok:
                    delay, retry = self._config.heartbeat_seconds, FIRST_RETRY_SECONDS
                # After a failure, only the delay (or a poke) ends the pause: the changes it could not
                # deliver would end it at once, and the sidecar would be asked again and again.
                jitter = random.uniform(0.9, 1.0)  # noqa: S311 - spreads the fleet, no secret
                await self._pause(stopping, delay * jitter, wake_on_change=ok)
            if self.registered:
                with contextlib.suppress(Refused, aiohttp.ClientError, TimeoutError, OSError):
                    await self.beat(session, leaving=True)

    async def _pause(self, stopping: asyncio.Event, delay: float, *, wake_on_change: bool) -> None:
        """Until the next heartbeat is due: the period, a poke, or a job's change."""
        waits: list[Coroutine[Any, Any, object]] = [stopping.wait(), self._poke.wait()]
        if wake_on_change and self._feed is not None and self._cursor is not None:
            waits.append(self._feed.wait_for_change(self._cursor, delay))
        tasks = [asyncio.create_task(wait) for wait in waits]
        try:
            done, _ = await asyncio.wait(tasks, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if done and not stopping.is_set():
            await asyncio.sleep(GATHER_SECONDS)

    def _changes(self) -> tuple[list[JobInfo], str | None]:
        if self._feed is None:
            return [], None
        jobs, cursor, full = self._feed.changes_since(self._cursor)
        if full or len(jobs) > MAX_PUSHED_JOBS:
            return [], cursor  # the first heartbeat, or a burst: the sidecar's catch-up read has them
        return jobs, cursor

    async def beat(self, session: aiohttp.ClientSession, *, leaving: bool = False) -> None:
        """One heartbeat; ``leaving``: the agent stops (the sidecar forgets it if it has no job)."""
        sent = self.fence.now() if self.fence is not None else 0.0
        jobs, cursor = self._changes()
        work = self._work()
        agent_id, current, renewal = self._config.id, self.credentials.current, self.credentials.next
        body = Heartbeat(
            url=self.url,
            instance=self.instance,
            labels=tuple(self._config.labels),
            max_jobs=work.max_jobs,
            jobs_running=work.jobs_running,
            draining=work.draining,
            maintenance=work.maintenance,
            unwell=work.unwell,
            version=self._version,
            heartbeat_seconds=self._config.heartbeat_seconds,
            jobs=tuple(jobs),
            cursor=cursor,
            leaving=leaving,
            previous_instances=self._previous_instances,
            fence=self._config.fence_terms,
            call_token=current.call_token(agent_id),
            next_identity_proof=renewal.proof(agent_id) if renewal else "",
            next_call_token=renewal.call_token(agent_id) if renewal else "",
        ).to_json()
        target = f"{self._config.router_url.rstrip('/')}/agents/{agent_id}"
        headers = {CREDENTIAL_HEADER: current.proof(agent_id)}
        bootstrap = self._bootstrap
        if bootstrap or renewal is not None:  # a renewal too: the fleet token vouches for an expired one
            headers["Authorization"] = f"Bearer {self._token.current()[0]}"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        # No redirect is followed: the fleet token and the identity proof go to router_url alone.
        async with session.put(
            target, json=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            text = await response.text(errors="replace")
            if response.status == 401 and (not bootstrap or renewal is not None):
                # The credential was not taken (the registration forgotten, expired, or held by
                # another identity): the next heartbeat, soon, bootstraps with the fleet token, and
                # a renewal under way is dropped (the sidecar asks again once it holds this one).
                self._bootstrap = True
                if renewal is not None:
                    self._credential_step(self.credentials.abandon)
                raise aiohttp.ClientResponseError(response.request_info, (), status=401, message=_error(text))
            if response.status in TRANSIENT:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=_error(text)
                )
            if response.status != 200:
                # Refused as a whole: its changes are left to the sidecar's catch-up read, so one the
                # sidecar cannot take does not come back with every heartbeat.
                self._cursor = cursor
                said = _redirect(response.headers.get("Location")) if 300 <= response.status < 400 else ""
                raise Refused(f"PUT {target}: HTTP {response.status}: {said or _error(text)}")
        if not self.registered:
            log.info(
                "registered with %s as %s at %s",
                self._config.router_url,
                self._config.id,
                self.url,
                extra={"action": "registered"},
            )
        self.registered, self.last_error = True, ""
        self._bootstrap = False
        self.last_heartbeat_at = datetime.now(UTC)
        if self.fence is not None:
            self.fence.heard(sent)
        self._credential_said(text, renewing=renewal is not None)
        self._cursor = cursor
        if self._feed is not None and jobs:
            await self._feed.mark_delivered(jobs)  # the sidecar has their outcomes: retention may go on

    def _credential_said(self, text: str, *, renewing: bool) -> None:
        """What the sidecar's answer says of the credential: renew it, or the renewal is held."""
        try:
            answer = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not isinstance(answer, dict):
            return
        if renewing and answer.get("credential_renewed") is True:
            self._credential_step(self.credentials.renewed)
        elif (
            answer.get("renew_credential") is True
            and self.credentials.next is None
            and self._credential_step(self.credentials.renew)
        ):
            self.poke()  # the next heartbeat carries it

    def _credential_step(self, step: Callable[[], None]) -> bool:
        """A renewal's step on disk; a failure (a full disk) is logged and tried again when the
        sidecar's answers ask again, the heartbeat itself stands."""
        try:
            step()
        except OSError as exc:
            log.warning(
                "the agent's credential could not be renewed on disk (%s): tried again at a later answer",
                exc.strerror or type(exc).__name__,
            )
            return False
        return True

    def _failed(self, problem: str, *, refused: bool) -> None:
        if problem != self.last_error:  # once per distinct message: a down sidecar is not a log flood
            level = logging.ERROR if refused else logging.WARNING
            log.log(level, "heartbeat to %s failed: %s", self._config.router_url, problem)
        self.registered = False
        self.last_error = problem

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if self._config.router_ca_file is None:
            return True  # the system's CAs for https://; nothing for http://
        return ssl.create_default_context(cafile=str(self._config.router_ca_file))


def proof_may_travel(router_url: str) -> bool:
    """Whether secrets sent to ``router_url`` cross no network in clear text: it is https, or a
    loopback address (``localhost``, 127.0.0.0/8, ::1)."""
    parts = urlsplit(router_url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _redirect(location: str | None) -> str:
    where = f" to {location[:200]}" if location else ""
    return (
        f"a redirect{where}, not followed (a heartbeat carries the agent's credential and the fleet token):"
        " set router_url to the sidecar's own address"
    )


def _error(text: str) -> str:
    """The ``error`` of a JSON answer, else the text; at most 300 characters."""
    with contextlib.suppress(ValueError, RecursionError):
        answer = json.loads(text)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            text = answer["error"]
    return text.strip()[:300] or "no message"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}: {exc.message}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {REQUEST_TIMEOUT_SECONDS:g} s"
    return str(exc) or type(exc).__name__
