"""The reconciler's configuration: one typed object, read from TOML, overridable by environment.

Override any scalar key with ``AGENTIC_RECONCILER_<SECTION>_<KEY>`` (e.g. ``AGENTIC_RECONCILER_HTTP_PORT``).
Secrets are never read from the TOML: it names the environment variable (``*_env``) or the file
(``*_file``) that holds each one. Each key's bounds sit beside its default
(:func:`servicekit.config.setting`). Tokens read from files (``[http] token_file``, ``[[agents]]
token_file``) follow their files while the sidecar runs (:func:`servicekit.credentials.follow`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.fleet.routing import WHEN_FULL
from reconciler.fleet.scope import Scope, parse_networks
from reconciler.fleet.versions import release
from servicekit.agreement import Agreement, broken, compare, refusal, table_key
from servicekit.config import ConfigError, build, check_tables, read_toml, setting, table
from servicekit.credentials import Secret, load_secret, load_tokens, read_secret
from servicekit.tls import server_context

__all__ = [
    "ACROSS_SERVICES",
    "AGREEMENTS",
    "ConfigError",
    "ReconcilerConfig",
    "Secrets",
    "disagreements",
    "load_config",
    "load_secrets",
    "parse_config",
]

ENV_PREFIX = "AGENTIC_RECONCILER_"
API_VERSIONS = ("auto", "v2", "v1")
STRATEGIES = ("targeted", "incremental", "batch")  # bench.naive_read: one request per job, for comparison
# A replica id is part of the lease's holder ("<replica id>@<host>:<pid>:<random>"): no "@" nor ":".
REPLICA_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class AirflowConfig:
    base_url: str = setting("http://127.0.0.1:8080", nonempty=True)
    api_version: str = setting("auto", one_of=API_VERSIONS)
    username: str = "admin"
    password_env: str = "AIRFLOW_PASSWORD"
    password_file: str = ""
    timeout_seconds: float = setting(10.0, gt=0)


@dataclass(frozen=True)
class RouterDBConfig:
    url: str = setting("sqlite:///reconciler.db", nonempty=True)
    # Migrate an older router DB at start (one machine); otherwise `db upgrade` first.
    upgrade_on_start: bool = setting(False)


@dataclass(frozen=True)
class PollConfig:
    interval_seconds: float = setting(1.0, gt=0)
    strategy: str = setting("targeted", one_of=STRATEGIES)
    full_resync_seconds: float = setting(300.0, gt=0)
    overlap_seconds: float = setting(10.0, ge=0)
    agent_sync_per_cycle: int = setting(50, ge=0)
    max_concurrent_reads: int = setting(8, ge=1)
    # Long-polls (GET /jobs/{id}?wait=) see changes made by other replicas by one read this often.
    watch_seconds: float = setting(0.5, gt=0, le=10)
    # The agents' catch-up read (one request per agent) runs on its own clock, every interval_seconds or
    # this often if shorter: exits are recorded at this pace whatever interval_seconds spares Airflow.
    agent_catch_up_seconds: float = setting(1.0, gt=0)


@dataclass(frozen=True)
class StopConfig:
    attempts: int = setting(5, ge=1)
    backoff_initial_seconds: float = setting(0.2, ge=0)
    backoff_max_seconds: float = setting(5.0, ge=0)
    timeout_seconds: float = setting(60.0, gt=0)
    concurrency: int = setting(32, ge=1)
    per_agent_concurrency: int = setting(8, ge=1)
    force_after_seconds: float = setting(120.0, gt=0)


@dataclass(frozen=True)
class HttpConfig:
    host: str = setting("127.0.0.1", nonempty=True)
    port: int = setting(8790, ge=0, le=65535)
    token_env: str = "AGENTIC_SIDECAR_TOKEN"  # may hold several tokens (rotation), like token_file
    token_file: str = ""
    # Optional read-only login to the pages under /ui/ (with any API token); "": API tokens only.
    viewer_token_env: str = "AGENTIC_VIEWER_TOKEN"
    viewer_token_file: str = ""
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file, the API is served over HTTPS
    tls_key_file: str = ""  # PEM private key, unencrypted
    rate_limit_per_second: float = setting(0.0, ge=0)  # per client (token, or address if none); 0 disables
    rate_limit_burst: int = setting(0, ge=0)  # bucket size; 0 means max(1, rate_limit_per_second)
    max_body_bytes: int = setting(1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # The /ui session cookie is Secure when served over TLS; true: also over plain HTTP, for a sidecar
    # behind a proxy that terminates TLS (browsers then send it over HTTPS only).
    cookie_secure: bool = setting(False)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context to serve with, or None for plain HTTP; raises ConfigError naming the key."""
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "tls_key_file" if self.tls_cert_file else "tls_cert_file"
            raise ConfigError(f"[http] {missing}: set tls_cert_file and tls_key_file both, or neither")
        if not self.tls_cert_file:
            return None
        try:
            return server_context(self.tls_cert_file, self.tls_key_file)
        except ValueError as exc:
            raise ConfigError(f"[http] {exc}") from None


@dataclass(frozen=True)
class LeaderConfig:
    lease_seconds: float = setting(15.0, ge=1)
    lease_name: str = setting("reconciler", nonempty=True)
    # This replica's name among the lease's holders, the same across its restarts, so that a restarted
    # replica takes its own lease back at once (reconciler/core/leadership.py). "": one kept in state_dir.
    replica_id: str = setting("")
    # Where the replica keeps its identity and the lock that proves its earlier process gone.
    # "": beside a SQLite router DB's file; with another database, no stable identity.
    state_dir: str = setting("")

    def identity_dir(self, router_db_url: str) -> Path | None:
        """Where this replica's identity lives: ``state_dir``, else a SQLite file's directory."""
        if self.state_dir:
            return Path(self.state_dir)
        return sqlite_dir(router_db_url)


@dataclass(frozen=True)
class FleetConfig:
    lost_after_seconds: float = setting(
        120.0, gt=0
    )  # no answer for this long: the agent is lost, its jobs end FAILED
    check_interval_seconds: float = setting(5.0, gt=0)  # how often each agent's /health is asked
    check_timeout_seconds: float = setting(
        10.0, gt=0
    )  # one health check's limit (a slow answer is still an answer)
    orphan_sweep_seconds: float = setting(
        60.0, gt=0
    )  # how often each agent's running jobs are compared with the DB
    # No agent the route allows has room: "wait" answers 503 (the operator retries), "refuse" 409.
    when_full: str = setting("wait", one_of=WHEN_FULL)
    # A job whose POST /run got neither the job nor a refusal (a 5xx, no answer) is sent again until
    # it is this old; then its agent is asked about it, and it ends FAILED unless it runs there.
    submit_give_up_seconds: float = setting(60.0, gt=0)
    # Agents that register themselves (PUT /agents/{id}) present this fleet token once, a bootstrap
    # token; then their own credential. Registration is off while neither the variable nor the file
    # is set.
    registration_token_env: str = setting("AGENTIC_FLEET_TOKEN", nonempty=True)
    registration_token_file: str = setting("")
    registration_ca_file: str = setting("")  # PEM CAs for https:// registered agents (default: system's)
    # A registered agent silent this long, with no active job left, is removed from the router DB.
    forget_after_seconds: float = setting(86400.0, gt=0)
    # Most agents failing at once holds back their losses (the sidecar's own network is the likely
    # fault) for at most this long; 0: never held.
    partition_hold_seconds: float = setting(600.0, ge=0)
    # What a registration may claim (reconciler/fleet/scope.py): id and label patterns, https only, the
    # networks its URL may resolve to, how many agents; and how many new agent processes a second
    # this replica calls back (0: no limit).
    registration_ids: list[str] = setting(["*"])
    registration_labels: list[str] = setting(["*"])
    require_https: bool = setting(False)
    allowed_networks: list[str] = setting([])
    max_agents: int = setting(0, ge=0)
    registration_rate_per_second: float = setting(50.0, ge=0)
    # A registered agent's credential is refused this long after it was issued (0: never); agents
    # are asked to renew theirs once half of it has passed, so a live agent never reaches it.
    credential_lifetime_seconds: float = setting(30 * 86400.0, ge=0, le=10 * 366 * 86400.0)
    # Agents saying an older version get no new job and are reported outdated (reconciler/fleet/versions.py);
    # "" (or lower than this sidecar's own floor): that floor.
    min_agent_version: str = setting("")

    def scope(self) -> Scope:
        """The registration scope; ConfigError naming the key of a value that is no network."""
        try:
            networks = parse_networks(self.allowed_networks)
        except ValueError as exc:
            raise ConfigError(f"[fleet] allowed_networks: {exc}") from None
        return Scope(
            ids=tuple(self.registration_ids),
            labels=tuple(self.registration_labels),
            require_https=self.require_https,
            networks=networks,
            max_agents=self.max_agents,
        )


@dataclass(frozen=True)
class AgentEntry:
    id: str
    url: str
    token_env: str = "AGENTIC_AGENT_TOKEN"
    token_file: str = ""
    labels: list[str] = field(default_factory=list)
    ca_file: str = ""


@dataclass(frozen=True)
class RetentionConfig:
    keep_days: float = setting(30.0, ge=0)  # jobs that ended longer ago go, with their audit rows; 0: never
    check_seconds: float = setting(3600.0, gt=0)  # how often the leader looks for them


@dataclass(frozen=True)
class ReconcilerConfig:
    airflow: AirflowConfig = field(default_factory=AirflowConfig)
    router_db: RouterDBConfig = field(default_factory=RouterDBConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    agents: list[AgentEntry] = field(default_factory=list)
    leader: LeaderConfig = field(default_factory=LeaderConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


@dataclass(frozen=True)
class Secrets:
    airflow_password: str = field(repr=False)
    http_tokens: Secret[tuple[str, ...]]  # every token a client may present (rotation); never in a repr
    agent_tokens: Mapping[str, Secret[str]]  # the token sent to each agent, by agent id
    # Tokens that log in to the pages only (read-only); None: only the API's tokens log in.
    viewer_tokens: Secret[tuple[str, ...]] | None = None
    # Tokens agents register with (the first is sent to registered agents); None: registration off.
    fleet_tokens: Secret[tuple[str, ...]] | None = None


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> ReconcilerConfig:
    return parse_config(read_toml(path), os.environ if env is None else env, where=str(path))


def parse_config(
    raw: Mapping[str, Any], env: Mapping[str, str], *, where: str = "config"
) -> ReconcilerConfig:
    names = [f.name for f in dataclasses.fields(ReconcilerConfig)]
    check_tables(raw, names, where)
    sections: dict[str, Any] = {}
    for name, section_type in _SECTIONS.items():
        sections[name] = build(
            section_type,
            table(raw, name),
            where=f"[{name}]",
            env=env,
            env_prefix=f"{ENV_PREFIX}{name}_",
        )
    agents_raw = raw.get("agents", [])
    if not isinstance(agents_raw, list) or not all(isinstance(entry, dict) for entry in agents_raw):
        raise ConfigError("[[agents]] must be an array of tables")
    agents = [
        build(AgentEntry, entry, where=f"[[agents]] #{i + 1}", env=env) for i, entry in enumerate(agents_raw)
    ]
    ids = [a.id for a in agents]
    if len(ids) != len(set(ids)):
        raise ConfigError("[[agents]] ids must be unique")
    config = ReconcilerConfig(agents=agents, **sections)
    _validate(config)
    return config


def load_secrets(config: ReconcilerConfig, env: Mapping[str, str] | None = None) -> Secrets:
    env = os.environ if env is None else env
    return Secrets(
        airflow_password=read_secret(
            "[airflow] password",
            env_name=config.airflow.password_env,
            file=config.airflow.password_file,
            env=env,
            file_key="password_file",
        ),
        http_tokens=load_tokens(
            "[http] token", env_name=config.http.token_env, file=config.http.token_file, env=env
        ),
        agent_tokens={
            a.id: load_secret(f"agent {a.id!r} token", env_name=a.token_env, file=a.token_file, env=env)
            for a in config.agents
        },
        viewer_tokens=_viewer_tokens(config.http, env),
        fleet_tokens=_fleet_tokens(config.fleet, env),
    )


def _fleet_tokens(fleet: FleetConfig, env: Mapping[str, str]) -> Secret[tuple[str, ...]] | None:
    """The fleet tokens registered agents present (several during a rotation; the first is the one
    sent to them); None: registration is off."""
    return _optional_tokens(
        "[fleet] registration token",
        env_name=fleet.registration_token_env,
        file=fleet.registration_token_file,
        file_key="registration_token_file",
        env=env,
    )


def _viewer_tokens(http: HttpConfig, env: Mapping[str, str]) -> Secret[tuple[str, ...]] | None:
    """The pages' viewer tokens; None: only the API's tokens log in."""
    return _optional_tokens(
        "[http] viewer token",
        env_name=http.viewer_token_env,
        file=http.viewer_token_file,
        file_key="viewer_token_file",
        env=env,
    )


def _optional_tokens(
    what: str, *, env_name: str, file: str, file_key: str, env: Mapping[str, str]
) -> Secret[tuple[str, ...]] | None:
    """Tokens followed like every token file, or None when neither their file nor their environment
    variable is set (optional, unlike the API's tokens)."""
    if not file and not env.get(env_name, "").strip():
        return None
    return load_tokens(what, env_name=env_name, file=file, env=env, file_key=file_key)


def sqlite_dir(url: str) -> Path | None:
    """The directory of a SQLite router DB's file; None for another database, or one in memory."""
    if not url.startswith("sqlite"):
        return None
    database = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).parent


# Settings that must agree (docs/configuration.md#settings-that-must-agree): every load checks them all,
# so `run` and `check-config` refuse a configuration that breaks one (exit code 2), naming its keys.
AGREEMENTS: tuple[Agreement, ...] = (
    compare(
        "[leader] lease_seconds",
        "<",
        "[fleet] lost_after_seconds",
        why=(
            "a leader cut off from the router DB keeps its term up to lease_seconds without recording "
            "registered agents' heartbeats: their silence would reach lost_after_seconds first, and healthy "
            "agents be declared lost, their jobs FAILED (a shorter lease ends the term first; the next "
            "term counts silence afresh)"
        ),
    ),
    compare(
        "[fleet] check_interval_seconds",
        "<",
        "[fleet] lost_after_seconds",
        why=(
            "the first health check after an answer would start lost_after_seconds after it or later: "
            "one dropped check would lose the agent and fail its jobs, with no suspect state between"
        ),
    ),
    compare(
        "[fleet] check_timeout_seconds",
        "<=",
        "[fleet] lost_after_seconds",
        why=(
            "an agent that answers within check_timeout_seconds, however slowly, must never lose a job; "
            "a check allowed longer than lost_after_seconds would count a slow answer as silence"
        ),
    ),
    compare(
        "[fleet] forget_after_seconds",
        ">",
        "[fleet] lost_after_seconds",
        why=(
            "a registered agent silent for less than lost_after_seconds is still live (a heartbeat or two "
            "lost); forgetting it sooner frees its id for another agent to take, and refuses the live "
            "agent's next heartbeat"
        ),
    ),
    compare(
        "[stop] force_after_seconds",
        ">",
        "[stop] timeout_seconds",
        why=(
            "a graceful stop (SIGTERM, the agent's grace_seconds, then SIGKILL) may take one call's "
            "timeout_seconds; forcing sooner sends a stop resumed after a failed call or a restart "
            "straight to SIGKILL, cutting the job's grace short"
        ),
    ),
    compare(
        "[stop] backoff_initial_seconds",
        "<=",
        "[stop] backoff_max_seconds",
        why="retries back off from the initial wait up to the max; an initial wait above it makes every "
        "wait the max plus jitter, so the max bounds nothing",
    ),
    Agreement(
        keys=("[leader] replica_id", "[leader] state_dir"),
        rule="[leader] replica_id needs [leader] state_dir unless the router DB is a SQLite file",
        why=(
            "the lock that keeps two processes given one replica id from both leading lives there "
            "(beside a SQLite router DB by default): without it, both would renew one lease"
        ),
        holds=lambda value: (
            not value("[leader] replica_id")
            or bool(value("[leader] state_dir"))
            or sqlite_dir(value("[router_db] url")) is not None
        ),
    ),
)

# Pairs that span the sidecar and its agents: neither process sees both values at start (an agent's
# settings stay on its VM), so these are checked where both are known: the example files and
# deployment manifests in tests, and by whoever configures both sides.
ACROSS_SERVICES: tuple[Agreement, ...] = (
    compare(
        "[stop] timeout_seconds",
        ">",
        "[agent] grace_seconds",
        why=(
            "the agent answers a stop once the job's process tree is gone, after up to grace_seconds: a "
            "shorter call times out on every job that ignores SIGTERM, and its stop is retried, late, "
            "then forced"
        ),
    ),
    compare(
        "[fleet] lost_after_seconds",
        ">",
        "[agent] heartbeat_seconds",
        times=3,
        why=(
            "a registered agent is suspect once three heartbeats late, and lost after lost_after_seconds "
            "of silence; when three heartbeats take longer than that, it goes from live straight to lost, "
            "later than lost_after_seconds says"
        ),
    ),
)


def disagreements(config: ReconcilerConfig) -> list[str]:
    """Every rule of :data:`AGREEMENTS` the configuration breaks, one line each (empty: none)."""

    def value(name: str) -> Any:
        section, key = table_key(name)
        return getattr(getattr(config, section), key)

    return broken(AGREEMENTS, value)


def _validate(config: ReconcilerConfig) -> None:
    """What no single key's bounds can say: relations between keys, and files that must exist."""
    replica = config.leader.replica_id
    checks = [
        (
            config.airflow.base_url.startswith(("http://", "https://")),
            "[airflow] base_url: must be http(s)://",
        ),
        (
            not replica or REPLICA_ID_PATTERN.fullmatch(replica) is not None,
            f"[leader] replica_id: {replica[:100]!r} must match ^{REPLICA_ID_PATTERN.pattern}$",
        ),
    ]
    ca = config.fleet.registration_ca_file
    checks.append((not ca or Path(ca).is_file(), "[fleet] registration_ca_file: no such file"))
    wanted = config.fleet.min_agent_version
    checks.append(
        (
            not wanted or release(wanted) is not None,
            f"[fleet] min_agent_version: {wanted[:100]!r} is no version (give its release, such as 0.2.0)",
        )
    )
    for a in config.agents:
        checks.append(
            (a.url.startswith(("http://", "https://")), f"[[agents]] {a.id!r} url: must be http(s)://")
        )
        checks.append(
            (not a.ca_file or Path(a.ca_file).is_file(), f"[[agents]] {a.id!r} ca_file: no such file")
        )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if problems := disagreements(config):
        raise ConfigError(refusal(problems))
    config.http.server_ssl_context()  # a missing or bad TLS file fails now, naming its key


_SECTIONS: dict[str, type[Any]] = {
    "airflow": AirflowConfig,
    "router_db": RouterDBConfig,
    "poll": PollConfig,
    "stop": StopConfig,
    "http": HttpConfig,
    "leader": LeaderConfig,
    "fleet": FleetConfig,
    "retention": RetentionConfig,
}
