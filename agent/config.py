"""The agent's configuration: one typed, frozen object read from TOML and the environment.

Keys live in the ``[agent]`` table of the TOML file (see ``config/agent.toml``). Every key can be
overridden by an environment variable ``AGENTIC_AGENT_<KEY>`` (``AGENTIC_AGENT_PORT=9000``), which wins
over the file. Error messages name the key and the problem, never a token.

Tokens are secrets and never come from the TOML: they are read from the environment variable named by
``token_env`` (default ``AGENTIC_AGENT_TOKEN``) or, if ``token_file`` is set, from that file. Either may
hold several tokens, separated by commas, spaces or newlines (so a token cannot contain those); a
request carrying any of them is accepted. That is how a token is rotated without a moment in which
clients are refused: add the new token next to the old one, move the clients to the new token, then
remove the old one. A ``token_file`` is followed while the agent runs (looked at every second, read
again at once on SIGHUP), so each step needs no restart; the environment cannot change under a
running process, so tokens from ``token_env`` need a restart at each step (running jobs are adopted).

TLS: with ``tls_cert_file`` and ``tls_key_file`` (PEM; both or neither) the agent serves HTTPS only.
Both files are loaded when the configuration is, so a missing, unreadable or mismatched file is a
:class:`ConfigError` at start, not a failure on the first connection.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent_api.fencing import FenceTerms
from agent_api.registration import AGENT_ID_PATTERN, LABEL_PATTERN, agent_url_problem
from servicekit.agreement import Agreement, broken, compare, refusal, table_key
from servicekit.config import ConfigError, build, check_tables, read_toml, setting, table
from servicekit.credentials import read_tokens
from servicekit.tls import server_context

__all__ = ["AGREEMENTS", "AgentConfig", "ConfigError", "disagreements", "load_config"]

ENV_PREFIX = "AGENTIC_AGENT_"
DEFAULT_TOKEN_ENV = "AGENTIC_AGENT_TOKEN"
DEFAULT_FLEET_TOKEN_ENV = "AGENTIC_FLEET_TOKEN"
# The registration settings' short names (a VM's boot script, a container's environment), each below
# its AGENTIC_AGENT_<KEY> name.
SHORT_NAMES = {"ROUTER_URL": "router_url", "SELF_URL": "self_url", "AGENT_ID": "id"}
DEFAULT_HOME = Path("/var/lib/agentic-agent")  # as root (the systemd unit's StateDirectory)
USER_HOME = Path("~/.local/state/agentic-agent")  # as anyone else: a home they can write


def default_home() -> Path:
    """Where job state goes when ``[agent] home`` is not set: /var/lib needs root, so an agent run by
    another user (a first try, a laptop) keeps its state under its own home directory."""
    return DEFAULT_HOME if os.geteuid() == 0 else USER_HOME.expanduser()


@dataclass(frozen=True)
class AgentConfig:
    id: str = setting(nonempty=True)  # default: the host name
    home: Path = setting()  # job state: <home>/jobs/<job_id>/{state.json,output.log,...}
    tokens: tuple[str, ...] = setting(secret=True)  # every token a request may carry (rotation)
    host: str = setting("127.0.0.1", nonempty=True)
    port: int = setting(8791, ge=1, le=65535)
    token_env: str = setting(DEFAULT_TOKEN_ENV, nonempty=True)
    token_file: Path | None = setting(None)
    grace_seconds: float = setting(10.0, ge=0, le=7 * 86400.0)  # SIGTERM -> SIGKILL
    max_body_bytes: int = setting(1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    poll_seconds: float = setting(0.5, gt=0)  # how often running jobs are checked (exit, timeout)
    max_jobs: int = setting(0, ge=0)  # unfinished jobs at once; past it /run is 503 (0: no limit)
    # Who a job may run as (run_as): user names, "*" for any user but root; an account of uid 0 only
    # when named here. And whether an agent running as root runs a job without run_as (as root).
    run_as_users: list[str] = setting(["*"])
    allow_root_jobs: bool = setting(False)
    drain_on_shutdown_seconds: float = setting(0.0, ge=0)  # on SIGTERM: drain, wait for jobs to end
    # Automatic maintenance (agent/self_check.py): with less free than this on the disk under its home
    # (or a home it cannot write), the agent takes no new job until it recovers (0: no disk check).
    min_free_disk_bytes: int = setting(128 * 1024**2, ge=0)
    # A job's output.log on disk: past this the middle is dropped (agent/logcap.py); 0: no cap.
    max_log_bytes: int = setting(100 * 1024**2, ge=0)
    # Finished jobs' directories (agent/retention.py): kept this long after the end once their outcome
    # was read, until the unread limit otherwise, and within the count and byte budgets (0: no limit).
    retain_finished_seconds: float = setting(7 * 86400.0, ge=0)
    retain_unread_seconds: float = setting(30 * 86400.0, ge=0)
    max_retained_jobs: int = setting(10_000, ge=0)
    max_retained_bytes: int = setting(10 * 1024**3, ge=0)
    retention_check_seconds: float = setting(60.0, gt=0)
    tls_cert_file: Path | None = setting(None)  # PEM certificate chain; with tls_key_file, serve HTTPS
    tls_key_file: Path | None = setting(None)  # PEM private key, unencrypted (protect it with file modes)
    # Registration (agent/registration.py): with router_url set, the agent registers with that sidecar
    # and heartbeats; the sidecar then needs no [[agents]] entry for it.
    router_url: str = setting("")
    self_url: str = setting("")  # how the sidecar reaches this agent; default from host, port, TLS
    labels: list[str] = setting([])  # what jobs routed by labels may find here (env: comma-separated)
    heartbeat_seconds: float = setting(10.0, ge=0.5, le=300)
    router_token_env: str = setting(DEFAULT_FLEET_TOKEN_ENV, nonempty=True)
    router_token_file: Path | None = setting(None)
    router_ca_file: Path | None = setting(None)  # PEM CAs for an https:// router_url (default: system's)
    # The fleet token(s): presented when registering (a bootstrap), never accepted on the agent's API.
    fleet_tokens: tuple[str, ...] = setting((), secret=True)
    # The fence (agent/fence.py): not heard from the sidecar for this long, the agent stops its
    # at_most_once jobs (0: never); at_most_once_default makes every job at_most_once.
    fence_after_seconds: float = setting(60.0, ge=0, le=7 * 86400.0)  # the bound the sidecar reads
    at_most_once_default: bool = setting(False)

    @property
    def fence_terms(self) -> FenceTerms:
        """What the agent tells the sidecar of its fence, which waits on it (agent_api/fencing.py)."""
        return FenceTerms(self.fence_after_seconds, self.grace_seconds, self.at_most_once_default)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file is not None else "http"

    @property
    def registers(self) -> bool:
        return bool(self.router_url)

    def reachable_url(self) -> str:
        """Where the sidecar reaches this agent: ``self_url``, or this host at ``port``."""
        if self.self_url:
            return self.self_url.rstrip("/")
        wildcard = self.host in ("0.0.0.0", "::", "")
        host = socket.getfqdn() if wildcard else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context to serve with, or None for plain HTTP; raises ConfigError naming the file."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        try:
            return server_context(self.tls_cert_file, self.tls_key_file)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def load_config(path: Path | str | None, *, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read ``[agent]`` from ``path`` (None: defaults only), apply env overrides, load the tokens."""
    env = os.environ if environ is None else environ
    env = {
        **{f"{ENV_PREFIX}{key}".upper(): env[short] for short, key in SHORT_NAMES.items() if short in env},
        **env,
    }
    document = read_toml(path) if path is not None else {}
    check_tables(document, ["agent"], str(path))
    section = table(document, "agent")
    # The tokens are read once the settings that say where they are (token_env, token_file) are known.
    settings = build(
        AgentConfig,
        section,
        where="[agent]",
        env=env,
        env_prefix=ENV_PREFIX,
        given={"tokens": (), "fleet_tokens": ()},
        defaults={"id": socket.gethostname(), "home": default_home()},
    )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ConfigError("[agent] tls_cert_file, tls_key_file: set both (to serve HTTPS) or neither")
    if problems := disagreements(settings):
        raise ConfigError(refusal(problems))
    _check_registration(settings)
    fleet: tuple[str, ...] = ()
    if settings.registers:
        fleet = read_tokens(
            "[agent] router token",
            env_name=settings.router_token_env,
            file=settings.router_token_file,
            env=env,
            file_key="router_token_file",
        )
    # A registered agent may have no token of its own: the sidecar calls it with its call token.
    own_given = settings.token_file is not None or bool(env.get(settings.token_env, "").strip())
    tokens = (
        read_tokens("[agent] token", env_name=settings.token_env, file=settings.token_file, env=env)
        if own_given or not settings.registers
        else ()
    )
    config = dataclasses.replace(settings, tokens=tokens, fleet_tokens=fleet)
    config.server_ssl_context()  # fail now, with the key's name, not on the first connection
    return config


# The agent's own settings that must agree (docs/configuration.md#settings-that-must-agree), checked at
# every load: the agent refuses to start (exit code 2) naming both keys. Pairs with the sidecar's
# settings are listed beside the sidecar's rules (reconciler.config.ACROSS_SERVICES).
AGREEMENTS: tuple[Agreement, ...] = (
    compare(
        "[agent] retain_unread_seconds",
        ">=",
        "[agent] retain_finished_seconds",
        why=(
            "a finished job whose outcome nobody has read yet (the sidecar has not recorded its rc) must "
            "be kept at least as long as one already read; a shorter limit removes unread outcomes first"
        ),
    ),
    Agreement(
        keys=("[agent] fence_after_seconds", "[agent] heartbeat_seconds"),
        rule="[agent] fence_after_seconds must be 0 (off) or above 2 times [agent] heartbeat_seconds",
        why=(
            "a registered agent hears from the sidecar once a heartbeat: a shorter fence would stop its "
            "at_most_once jobs when a single heartbeat is late or lost"
        ),
        holds=lambda value: (
            float(value("[agent] fence_after_seconds")) == 0
            or float(value("[agent] fence_after_seconds")) > 2 * float(value("[agent] heartbeat_seconds"))
        ),
    ),
    Agreement(
        keys=("[agent] at_most_once_default", "[agent] fence_after_seconds"),
        rule="[agent] at_most_once_default needs [agent] fence_after_seconds above 0",
        why="every job would be promised a fence that never fires",
        holds=lambda value: (
            not value("[agent] at_most_once_default") or float(value("[agent] fence_after_seconds")) > 0
        ),
    ),
)


def disagreements(config: AgentConfig) -> list[str]:
    """Every rule of :data:`AGREEMENTS` the configuration breaks, one line each (empty: none)."""
    return broken(AGREEMENTS, lambda name: getattr(config, table_key(name)[1]))


def _check_registration(settings: AgentConfig) -> None:
    """The registration settings make sense together (problems named by key, never a token)."""
    for key in ("router_url", "self_url"):
        value = getattr(settings, key)
        if value and (problem := agent_url_problem(value)) is not None:
            raise ConfigError(f"[agent] {key}: {problem}")
    if settings.registers and validate_id_problem(settings.id):
        raise ConfigError(f"[agent] id: {validate_id_problem(settings.id)} (to register with router_url)")
    for label in settings.labels:
        if LABEL_PATTERN.fullmatch(label) is None:
            raise ConfigError(f"[agent] labels: {label[:100]!r} must match ^{LABEL_PATTERN.pattern}$")
    if settings.router_ca_file is not None and not settings.router_ca_file.is_file():
        raise ConfigError(f"[agent] router_ca_file: {settings.router_ca_file}: no such file")


def validate_id_problem(agent_id: str) -> str | None:
    if AGENT_ID_PATTERN.fullmatch(agent_id) is None:
        return f"{agent_id[:100]!r} must match ^{AGENT_ID_PATTERN.pattern}$"
    return None
