"""What a heartbeat claims, judged against the row the router DB holds for its agent id, and the pure
checks of a call-back: whether the agent answering at a URL is the one that registered
(:func:`call_back_problem`), what a failed look at an old URL says of the process there
(:func:`unanswered`), and whether a move left it behind (:func:`still_there_problem`). No I/O:
:class:`reconciler.fleet.registry.Registry` asks and applies."""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from router_db import AgentRecord


class Claim(StrEnum):
    """What a heartbeat is, against the row the router DB holds for its agent id."""

    NEW = "new"  # no row: a first registration
    BEAT = "beat"  # the row's own process
    RESTART = "restart"  # another process at the row's URL: the agent restarted there
    MOVE = "move"  # the row's identity at another URL, succeeding the row's instance: proven
    TAKEOVER = "takeover"  # anything else elsewhere: only a long-silent id without active jobs


@dataclass(frozen=True)
class Judged:
    claim: Claim
    unproven: str = ""  # a TAKEOVER: why it is no proven move (said if the router DB refuses it)
    refusal: str = ""  # refused outright (409)


def judge_claim(
    held: AgentRecord | None,
    *,
    url: str,
    instance: str,
    fingerprint: str,
    previous_instances: Sequence[str],
) -> Judged:
    """A heartbeat (``url``, ``instance``, the fingerprint of its identity proof, its home's earlier
    instances) against ``held``, the agent id's row. Pure: the router DB's upsert enforces the same."""
    if held is None:
        return Judged(Claim.NEW)
    if held.instance == instance:
        # A row without an identity (written by a replica older than identities, during a rolling
        # upgrade) takes the one its own process proves: the call-back checks it is that process.
        if held.identity_fingerprint and held.identity_fingerprint != fingerprint:
            return Judged(
                Claim.BEAT,
                refusal=f"instance {instance} of agent {held.agent_id} is registered with another identity:"
                " this heartbeat is not from that process",
            )
        if held.url != url:
            # One process keeps the address it started with: the same instance elsewhere is its
            # credential replayed (the instance is public in /healthz), not the agent.
            return Judged(
                Claim.BEAT,
                refusal=f"instance {instance} of agent {held.agent_id} is registered at {held.url}: one "
                "process keeps its address (restarted at another, the agent moves its registration)",
            )
        return Judged(Claim.BEAT)
    if held.url == url and held.identity_fingerprint in ("", fingerprint):
        # Another process at the row's address, of the same home: the agent restarted there. A row
        # without an identity (an older agent's or replica's) takes the one its restarted process
        # proves, or none. Another identity there (a rebuilt VM, a second home), or none where the row
        # has one (a fleet-token holder speaking for the agent), is another agent: it would be sent
        # stops for jobs it does not know, so it falls to the takeover rule below, as it would at any
        # other address.
        return Judged(Claim.RESTART)
    if not held.identity_fingerprint:
        why = "its registration holds no identity (made by an agent older than identities)"
    elif not fingerprint:
        why = (
            "this heartbeat proves no identity (an agent older than identities, or one that keeps its"
            " proof off a plain http router_url)"
        )
    elif fingerprint != held.identity_fingerprint:
        why = "this heartbeat proves another identity than the registration's (another home, or a wiped one)"
    elif held.instance not in previous_instances:
        why = (
            f"the registration's instance {held.instance} is not in this home's instance history"
            " (an older copy of the home)"
        )
    else:
        return Judged(Claim.MOVE)
    return Judged(Claim.TAKEOVER, unproven=why)


def _registration(answer: Mapping[str, Any]) -> tuple[str, str | None]:
    """The identity fingerprint ("" for none) and instance an agent's ``/healthz`` shows."""
    shown = answer.get("registration")
    shown = shown if isinstance(shown, dict) else {}
    fingerprint, instance = shown.get("identity_fingerprint"), shown.get("instance")
    return (
        fingerprint if isinstance(fingerprint, str) else "",
        instance[:64] if isinstance(instance, str) else None,
    )


def call_back_problem(
    answer: Mapping[str, Any], *, agent_id: str, url: str, instance: str, fingerprint: str
) -> str | None:
    """Why the agent answering ``/healthz`` at ``url`` did not send this heartbeat (None: it did, as far
    as an agent shows): it names another id, or shows another identity or instance. An agent older
    than identities shows neither, and its heartbeats prove none."""
    said = answer.get("agent_id")
    if said != agent_id:
        named = f"{said[:200]!r}" if isinstance(said, str) else "no agent_id"
        return f"the agent at {url} answers as {named}, not {agent_id!r}"
    shown, running = _registration(answer)
    if shown != fingerprint:
        if not fingerprint:
            return f"the agent at {url} proves an identity this heartbeat does not: it did not send it"
        return f"the agent at {url} does not hold the identity this heartbeat proves"
    if (fingerprint or running is not None) and running != instance:
        # An agent that shows its instance is the very process that sent this heartbeat, proof or not:
        # a fleet-token holder cannot speak for the process answering there.
        return f"the agent at {url} is another process (instance {running!r}), not instance {instance!r}"
    return None


@dataclass(frozen=True)
class Unanswered:
    """What asking ``/health`` at a URL got instead of an agent's answer: ``why``, and whether it shows
    that nothing is there any more (``gone``)."""

    why: str
    gone: bool = False


# getaddrinfo's "no such name" (NXDOMAIN) and "no address for it"; a resolver that failed (EAI_AGAIN)
# says nothing of the host.
_NO_SUCH_NAME = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


def unanswered(error: BaseException) -> Unanswered:
    """How a failed ``/health`` at an old URL reads: gone only when the connection was refused (no
    process listens at that port) or the host name does not exist. Everything else is no answer, not
    an absence: a timeout (the process may be paused, overloaded, or cut off from this replica alone),
    a reset, a TLS failure, an unreachable host, a 5xx or an answer that is no agent's. ``error`` is
    the client's (:class:`AgentError`); the connector's error it was raised from, if any, is read."""
    cause: BaseException | None = error
    for _ in range(4):  # the client's error, raised while handling the connector's
        if cause is None or isinstance(cause, aiohttp.ClientConnectorError):
            break
        cause = cause.__cause__ or cause.__context__
    why = str(error)[:300] or type(error).__name__
    if isinstance(cause, aiohttp.ClientProxyConnectionError) or not isinstance(
        cause, aiohttp.ClientConnectorError
    ):
        return Unanswered(why)
    if isinstance(cause, aiohttp.ClientConnectorDNSError):
        return Unanswered(why, gone=cause.os_error.errno in _NO_SUCH_NAME)
    # A refusal comes from the host's kernel: nothing listens there. A process that is only paused or
    # overloaded still holds its listening socket, whose connections wait unanswered: a timeout.
    return Unanswered(why, gone=cause.os_error.errno == errno.ECONNREFUSED)


_PORTS = {"http": 80, "https": 443}


def moved_in_place(old_url: str, new_url: str) -> bool:
    """The URLs differ in their scheme only (http to https on the same port): one socket, at which the
    call-back found the mover, and where no second process can listen. Asked there in the old scheme,
    the mover would give no clear answer (TLS spoken to plain http, or the reverse)."""
    old, new = urlsplit(old_url), urlsplit(new_url)
    try:
        return (old.hostname, old.port or _PORTS[old.scheme], old.path.rstrip("/")) == (
            new.hostname,
            new.port or _PORTS[new.scheme],
            new.path.rstrip("/"),
        )
    except (KeyError, ValueError):
        return False


def still_there_problem(
    answer: Mapping[str, Any] | Unanswered, *, agent_id: str, old_url: str, instance: str
) -> str | None:
    """Why a move away from ``old_url`` must wait (None: it need not), given what ``/health`` answers
    there. Another process answering there as the agent (not the mover itself, reached by another
    name) still holds the registration: two processes of one identity. So may one that gives no clear
    answer: only a refused connection, a host name that no longer exists or another agent answering
    there shows that the registration's process is gone (a copy of the home must not take the place
    of an agent that is only slow)."""
    if isinstance(answer, Unanswered):
        if answer.gone:
            return None
        return (
            f"agent {agent_id} gives no clear answer at {old_url} ({answer.why}): its process there may "
            "be alive, only slow, and one identity is held by one process at a time; the registration "
            "stays there until that process answers, or nothing listens there"
        )
    if answer.get("agent_id") != agent_id:
        return None
    _, running = _registration(answer)
    if running == instance:
        return None
    return (
        f"agent {agent_id} still answers at {old_url} (instance {running or 'unknown'}): its registration "
        "stays there while it does, as one identity is held by one process at a time"
    )
