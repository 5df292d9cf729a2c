"""The agent's identity: a secret kept in its home, and the instances that home has run.

A registered agent restarted at another URL (a new port, http to https, a host name that now resolves
otherwise) must move its registration there at once, keeping its jobs, while anyone else holding only
the fleet token must not be able to move it (that would send its jobs' stops, and the fleet token, to
an address of their choosing). What tells the two apart is what only the agent's home has:

- ``<home>/identity``: 32 random bytes (hex), created once, mode 0600, never rewritten. Every heartbeat
  carries a proof derived from it and the agent id (:meth:`Identity.proof`); the sidecar keeps only
  the proof's fingerprint. A VM rebuilt with an empty disk has a new secret: it is a new agent, and
  cannot take over the old registration's jobs.
- ``<home>/instances.json``: this home's last :data:`MAX_PREVIOUS_INSTANCES` instance ids, written
  *before* the instance's first heartbeat, so whatever instance the sidecar holds for this agent is
  in its home's history. A move must cite the instance it succeeds: an old copy of the home (a
  snapshot, a backup) cannot take back a registration its original has since moved on.

The proof is also the agent's credential (:mod:`agent_api.registration`): once registered, the agent
speaks for its id with it alone, and the sidecar calls the agent with a token derived from the same
secret (:meth:`Identity.call_token`), which the agent accepts and which opens this agent alone. The
sidecar asks for a renewal before the credential's lifetime ends (:class:`Credentials`): a new secret
is written to ``<home>/identity.next`` first, sent as the next credential, and moved over
``identity`` once the sidecar says it holds it. An agent stopped half-way finds ``identity.next`` at
its next start and sends it again: the sidecar takes a renewal it already holds as held.

A job running as the agent's own user can read the secret, as it can the fleet token's file
(``run_as`` keeps jobs out of the agent's files).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import ConfigError
from agent.jobfiles import write_json_atomic
from agent_api.registration import INSTANCE_PATTERN, MAX_PREVIOUS_INSTANCES
from servicekit.credentials import Secret

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity"
NEXT_IDENTITY_FILE = "identity.next"  # a renewal under way
INSTANCES_FILE = "instances.json"
SECRET_BYTES = 32
PREVIOUS_CALL_TOKEN_SECONDS = 600.0  # after a renewal: a sidecar replica may still present the old one
_PROOF_CONTEXT = b"agentic-agent registration proof v1\x00"
_CALL_CONTEXT = b"agentic-agent sidecar call token v1\x00"


@dataclass(frozen=True)
class Identity:
    secret: bytes = field(repr=False)
    previous_instances: tuple[str, ...]  # this home's instances before the current one, oldest first

    def proof(self, agent_id: str) -> str:
        """What a heartbeat presents: bound to the agent id, so the secret itself never leaves the VM
        and a home reused under another id proves nothing about the first."""
        return hmac.new(self.secret, _PROOF_CONTEXT + agent_id.encode(), hashlib.sha256).hexdigest()

    def call_token(self, agent_id: str) -> str:
        """What the sidecar presents when it calls this agent: derived apart from the proof, so
        neither tells anything of the other."""
        return hmac.new(self.secret, _CALL_CONTEXT + agent_id.encode(), hashlib.sha256).hexdigest()


class Credentials:
    """The agent's credential as it is now, a renewal under way, and the call tokens it accepts."""

    def __init__(self, home: Path, agent_id: str, identity: Identity, *, clock: Callable[[], float]) -> None:
        self._home = home
        self._id = agent_id
        self._clock = clock
        self.current = identity
        self.next: Identity | None = None
        if (home / NEXT_IDENTITY_FILE).exists():  # stopped half-way through a renewal: go on with it
            self.next = Identity(_secret(home / NEXT_IDENTITY_FILE), identity.previous_instances)
        self._previous: tuple[str, float] | None = None  # a call token renewed away, until when
        self._accepted: tuple[str, ...] = ()

    def renew(self) -> None:
        """Start a renewal (the sidecar asked): the next secret is on disk before it is ever sent."""
        if self.next is None:
            self.next = Identity(_secret(self._home / NEXT_IDENTITY_FILE), self.current.previous_instances)

    def renewed(self) -> None:
        """The sidecar holds the next credential: it becomes the current one, on disk first. Done
        once: a file moved already (a directory sync that failed after it) is not moved again."""
        if self.next is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._home / NEXT_IDENTITY_FILE, self._home / IDENTITY_FILE)
        _sync_directory(self._home)
        old = self.current.call_token(self._id)
        self._previous = (old, self._clock() + PREVIOUS_CALL_TOKEN_SECONDS)
        self.current, self.next = self.next, None
        log.info("agent credential renewed", extra={"action": "credential_renewed"})

    def abandon(self) -> None:
        """Drop a renewal the sidecar did not take (it answered that the current credential is not
        the registration's): the next one starts from a new secret."""
        if self.next is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._home / NEXT_IDENTITY_FILE)
            self.next = None

    def call_tokens(self) -> tuple[str, ...]:
        """The tokens a call from the sidecar may carry now: the current credential's, a renewal's
        under way, and for a while the one renewed away. The same tuple while nothing changed."""
        tokens = [self.current.call_token(self._id)]
        if self.next is not None:
            tokens.append(self.next.call_token(self._id))
        if self._previous is not None and self._clock() < self._previous[1]:
            tokens.append(self._previous[0])
        if tuple(tokens) != self._accepted:
            self._accepted = tuple(tokens)
        return self._accepted


class CallTokens(Secret[tuple[str, ...]]):
    """:meth:`Credentials.call_tokens` as a :class:`Secret`, for the API's token check."""

    def __init__(self, credentials: Credentials) -> None:
        super().__init__((), what="[agent] sidecar call token")
        self._credentials = credentials

    def current(self) -> tuple[str, ...]:
        return self._credentials.call_tokens()


def load_identity(home: Path, instance: str) -> Identity:
    """The home's identity (created on first use), with ``instance`` recorded as its newest instance.

    Raises :class:`ConfigError` for an identity file that is not one (restore it, or remove it to start
    as a new agent) and OSError when the home cannot be written."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = _secret(home / IDENTITY_FILE)
    history = _history(home / INSTANCES_FILE)
    # Before the first heartbeat: the sidecar can only ever hold an instance this file names.
    write_json_atomic(home / INSTANCES_FILE, [*history, instance][-MAX_PREVIOUS_INSTANCES - 1 :])
    return Identity(secret=secret, previous_instances=tuple(history[-MAX_PREVIOUS_INSTANCES:]))


def _secret(path: Path) -> bytes:
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    # Written whole under another name, then linked: a reader never sees half a secret, and of two
    # agents starting at once on one home, one creates it and the other reads it.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(SECRET_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
            _sync_directory(path.parent)
            log.info("agent identity created in %s", path)
    finally:
        os.unlink(tmp)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    with open(path, encoding="ascii", errors="replace") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        text = handle.read(4 * SECRET_BYTES).strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:  # never its content in the message
        raise ConfigError(
            f"{path} is not an agent identity ({2 * SECRET_BYTES} hexadecimal digits): restore it from a "
            "backup of this home, or remove it to start as a new agent (which cannot take over this "
            "agent's registration while it holds jobs)"
        )
    if stat.S_IMODE(mode) & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others: made 0600 (it proves this agent's identity)", path)
    return secret


def _history(path: Path) -> list[str]:
    """The instances recorded so far; a missing or damaged file is an empty history (a move then waits
    for the lost rule, as one without evidence would)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): this home's instance history starts again", path, exc)
        return []
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and INSTANCE_PATTERN.fullmatch(v)]


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
