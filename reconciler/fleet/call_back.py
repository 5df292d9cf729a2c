"""The call-back: the sidecar asks the URL a heartbeat gave whether the agent there is the one that sent
it, before the router DB takes it (and again before a credential is renewed); and it checks that URL's
addresses against ``[fleet] allowed_networks`` before calling anything. A failure answers generic
words (:class:`CallBackFailed`): what answered there stays in the sidecar's log, so registration is
no way to probe what the sidecar reaches."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from agent_api.client import AgentClient, AgentError
from agent_api.registration import Heartbeat
from reconciler.config import FleetConfig
from reconciler.errors import Forbidden, Unverified
from reconciler.fleet.claims import Unanswered, call_back_problem, unanswered
from reconciler.fleet.scope import Scope
from servicekit.credentials import Secret

log = logging.getLogger("reconciler.fleet.registry")

VERIFY_TIMEOUT_SECONDS = 5.0  # the call back to a registering agent, and the look at a mover's old URL


class OutOfScope(Forbidden):
    """The heartbeat claims an id, a label or an address [fleet] does not allow registrations."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class CallBackFailed(Unverified):
    """The URL a heartbeat gave did not answer as that agent. The answer says only that: what
    answered there (a local service's page, a closed port against an open one) would make
    registration a way to probe whatever the sidecar reaches. ``detail``, for the sidecar's log, says
    what answered."""

    def __init__(self, agent_id: str, url: str, detail: str) -> None:
        super().__init__(
            f"the sidecar could not verify agent {agent_id} at {url}: the reason is in the sidecar's log "
            "(agent_refused); check the agent's SELF_URL and that the sidecar reaches it",
        )
        self.detail = detail


class CallBack:
    def __init__(self, config: FleetConfig, scope: Scope, token: Secret[str]) -> None:
        self._config = config
        self._scope = scope
        self._token = token  # what registered agents older than credentials are called with
        self._session: aiohttp.ClientSession | None = None

    def _agent_at(self, url: str, token: str) -> AgentClient:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return AgentClient(
            url,
            token,
            session=self._session,
            timeout=VERIFY_TIMEOUT_SECONDS,
            ca_file=self._config.registration_ca_file or None,
        )

    async def answer_at(self, url: str) -> dict[str, Any] | Unanswered:
        """What ``/health`` at ``url`` answers, asked without a token, or what came instead."""
        try:
            return await self._agent_at(url, "").health()
        except (AgentError, ValueError) as exc:
            return unanswered(exc)

    async def confirm_renewal(self, agent_id: str, url: str, renewal: str) -> None:
        """The agent at its registration's URL is the one renewing: its ``/healthz`` shows the pending
        credential's fingerprint. A stolen credential cannot renew itself into a thief's secret, which
        the agent's own process would not show. 422 otherwise (the agent tries again)."""
        try:
            answer = await self._agent_at(url, "").health()
        except (AgentError, ValueError) as exc:
            raise CallBackFailed(agent_id, url, f"renewal: the sidecar cannot use {url}: {exc}") from None
        shown = answer.get("registration")
        pending = shown.get("next_identity_fingerprint") if isinstance(shown, dict) else None
        if answer.get("agent_id") != agent_id or pending != renewal:
            raise CallBackFailed(
                agent_id, url, f"renewal: the agent at {url} does not show the credential being renewed to"
            )

    async def check_address(self, url: str) -> None:
        """:class:`OutOfScope` unless every address ``url``'s host resolves to is in
        [fleet] allowed_networks (nothing to check without them)."""
        if not self._scope.networks:
            return
        host = urlsplit(url).hostname or ""
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            problem = self._scope.address_problem(host, [str(info[4][0]) for info in found])
        except OSError as exc:
            problem = f"{host!r} cannot be resolved: {exc.strerror or exc}"
        if problem is not None:
            # The answer names no address and no resolver error: registration is no DNS oracle.
            log.warning(
                "registration at %s refused: %s", url, problem, extra={"action": "agent_out_of_scope"}
            )
            raise OutOfScope(f"{host!r} does not resolve within [fleet] allowed_networks")

    async def verify(self, agent_id: str, beat: Heartbeat, fingerprint: str) -> None:
        """The agent at the heartbeat's URL is ``agent_id``, the very process that sent it (as its
        instance and identity show), and takes the call token the heartbeat carries (the fleet token,
        from an agent older than credentials); or :class:`Refused` (422)."""
        url = beat.url
        try:
            # Who answers is asked without a token: a mistyped address must not receive the fleet's.
            answer = await self._agent_at(url, "").health()
            problem = call_back_problem(
                answer, agent_id=agent_id, url=url, instance=beat.instance, fingerprint=fingerprint
            )
            if problem is not None:
                raise CallBackFailed(agent_id, url, problem)
            # The token the sidecar will call it with is accepted there.
            await self._agent_at(url, beat.call_token or self._token.current()).jobs("QUEUED")
        except (AgentError, ValueError) as exc:
            raise CallBackFailed(agent_id, url, f"the sidecar cannot use {url}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
