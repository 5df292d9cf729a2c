"""The reconciler's configuration: one typed object, read from TOML, overridable by environment.

Override any scalar key with ``AGENTIC_RECONCILER_<SECTION>_<KEY>`` (e.g. ``AGENTIC_RECONCILER_HTTP_PORT``).
Secrets are never read from the TOML: it names the environment variable (``*_env``) or the file
(``*_file``) that holds each one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import ssl
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from servicekit.tls import server_context

ENV_PREFIX = "AGENTIC_RECONCILER_"
API_VERSIONS = ("auto", "v2", "v1")
STRATEGIES = ("incremental", "batch", "naive")


class ConfigError(Exception):
    """A configuration problem; the message names the key and the problem, never a secret."""


@dataclass(frozen=True)
class AirflowConfig:
    base_url: str = "http://127.0.0.1:8080"
    api_version: str = "auto"
    username: str = "admin"
    password_env: str = "AIRFLOW_PASSWORD"
    password_file: str = ""
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class RouterDBConfig:
    url: str = "sqlite:///reconciler.db"


@dataclass(frozen=True)
class PollConfig:
    interval_seconds: float = 1.0
    strategy: str = "incremental"
    full_resync_seconds: float = 30.0
    overlap_seconds: float = 10.0
    agent_sync_per_cycle: int = 50
    max_concurrent_reads: int = 8


@dataclass(frozen=True)
class StopConfig:
    attempts: int = 5
    backoff_initial_seconds: float = 0.2
    backoff_max_seconds: float = 5.0
    timeout_seconds: float = 60.0
    concurrency: int = 32
    per_agent_concurrency: int = 8
    force_after_seconds: float = 120.0


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8790
    token_env: str = "AGENTIC_SIDECAR_TOKEN"  # may hold several tokens (rotation), like token_file
    token_file: str = ""
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file, the API is served over HTTPS
    tls_key_file: str = ""  # PEM private key, unencrypted
    rate_limit_per_second: float = 0.0  # per client (token, or address if none); 0 disables
    rate_limit_burst: int = 0  # bucket size; 0 means max(1, rate_limit_per_second)

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
    lease_seconds: float = 15.0
    lease_name: str = "reconciler"


@dataclass(frozen=True)
class FleetConfig:
    lost_after_seconds: float = 120.0  # no answer for this long: the agent is lost, its jobs end FAILED
    check_interval_seconds: float = 5.0  # how often each agent's /health is asked
    check_timeout_seconds: float = 10.0  # one health check's limit (a slow answer is still an answer)
    orphan_sweep_seconds: float = 60.0  # how often each agent's running jobs are compared with the DB


@dataclass(frozen=True)
class AgentEntry:
    id: str
    url: str
    token_env: str = "AGENTIC_AGENT_TOKEN"
    token_file: str = ""
    labels: list[str] = field(default_factory=list)
    ca_file: str = ""


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


@dataclass(frozen=True)
class Secrets:
    airflow_password: str
    http_token: str
    agent_tokens: Mapping[str, str]


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> ReconcilerConfig:
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, env)


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str]) -> ReconcilerConfig:
    unknown = set(raw) - {f.name for f in dataclasses.fields(ReconcilerConfig)}
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}]")
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(ReconcilerConfig):
        if f.name == "agents":
            continue
        section = raw.get(f.name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{f.name}] must be a table")
        sections[f.name] = _build(_section_type(f.name), section, f"[{f.name}]", env, env_prefix=f.name)
    agents_raw = raw.get("agents", [])
    if not isinstance(agents_raw, list):
        raise ConfigError("[[agents]] must be an array of tables")
    agents = [_build(AgentEntry, entry, f"[[agents]] #{i + 1}", env) for i, entry in enumerate(agents_raw)]
    ids = [a.id for a in agents]
    if len(ids) != len(set(ids)):
        raise ConfigError("[[agents]] ids must be unique")
    config = ReconcilerConfig(agents=agents, **sections)
    _validate(config)
    return config


def load_secrets(config: ReconcilerConfig, env: Mapping[str, str] | None = None) -> Secrets:
    env = os.environ if env is None else env
    return Secrets(
        airflow_password=_secret(
            "[airflow] password", config.airflow.password_env, config.airflow.password_file, env
        ),
        http_token=_secret("[http] token", config.http.token_env, config.http.token_file, env),
        agent_tokens={
            a.id: _secret(f"agent {a.id!r} token", a.token_env, a.token_file, env) for a in config.agents
        },
    )


def _secret(what: str, env_name: str, file_name: str, env: Mapping[str, str]) -> str:
    if file_name:
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read file {file_name}: {exc.strerror}") from None
    else:
        value = env.get(env_name, "")
    if not value:
        source = f"file {file_name}" if file_name else f"environment variable {env_name}"
        raise ConfigError(f"{what}: {source} is empty or unset")
    return value


def _validate(config: ReconcilerConfig) -> None:
    checks = [
        (
            config.airflow.api_version in API_VERSIONS,
            f"[airflow] api_version: one of {', '.join(API_VERSIONS)}",
        ),
        (config.poll.strategy in STRATEGIES, f"[poll] strategy: one of {', '.join(STRATEGIES)}"),
        (config.poll.full_resync_seconds > 0, "[poll] full_resync_seconds: must be > 0"),
        (config.poll.overlap_seconds >= 0, "[poll] overlap_seconds: must be >= 0"),
        (config.stop.per_agent_concurrency >= 1, "[stop] per_agent_concurrency: must be >= 1"),
        (config.stop.force_after_seconds > 0, "[stop] force_after_seconds: must be > 0"),
        (
            config.airflow.base_url.startswith(("http://", "https://")),
            "[airflow] base_url: must be http(s)://",
        ),
        (config.airflow.timeout_seconds > 0, "[airflow] timeout_seconds: must be > 0"),
        (config.poll.interval_seconds > 0, "[poll] interval_seconds: must be > 0"),
        (config.poll.agent_sync_per_cycle >= 0, "[poll] agent_sync_per_cycle: must be >= 0"),
        (config.poll.max_concurrent_reads >= 1, "[poll] max_concurrent_reads: must be >= 1"),
        (config.stop.attempts >= 1, "[stop] attempts: must be >= 1"),
        (config.stop.concurrency >= 1, "[stop] concurrency: must be >= 1"),
        (config.stop.timeout_seconds > 0, "[stop] timeout_seconds: must be > 0"),
        (0 <= config.http.port <= 65535, "[http] port: must be 0-65535"),
        (
            math.isfinite(config.http.rate_limit_per_second) and config.http.rate_limit_per_second >= 0,
            "[http] rate_limit_per_second: must be >= 0 (0 disables rate limiting)",
        ),
        (config.http.rate_limit_burst >= 0, "[http] rate_limit_burst: must be >= 0"),
        (bool(config.router_db.url), "[router_db] url: must not be empty"),
        (config.leader.lease_seconds >= 1, "[leader] lease_seconds: must be >= 1"),
        (bool(config.leader.lease_name), "[leader] lease_name: must not be empty"),
        (config.fleet.lost_after_seconds > 0, "[fleet] lost_after_seconds: must be > 0"),
        (config.fleet.check_interval_seconds > 0, "[fleet] check_interval_seconds: must be > 0"),
        (
            0 < config.fleet.check_timeout_seconds <= config.fleet.lost_after_seconds,
            "[fleet] check_timeout_seconds: must be > 0 and at most lost_after_seconds",
        ),
        (config.fleet.orphan_sweep_seconds > 0, "[fleet] orphan_sweep_seconds: must be > 0"),
    ]
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
    config.http.server_ssl_context()  # a missing or bad TLS file fails now, naming its key


T = TypeVar("T")


def _section_type(name: str) -> type[Any]:
    return get_type_hints(ReconcilerConfig)[name]  # type: ignore[no-any-return]


def _build(
    cls: type[T], values: Mapping[str, Any], where: str, env: Mapping[str, str], env_prefix: str | None = None
) -> T:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where} {sorted(unknown)[0]}: unknown key")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = values.get(f.name, dataclasses.MISSING)
        if env_prefix is not None:
            env_name = f"{ENV_PREFIX}{env_prefix}_{f.name}".upper()
            if env_name in env:
                value = _from_env(env[env_name], hints[f.name], f"{env_name}")
        if value is dataclasses.MISSING:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where} {f.name}: required")
            continue
        kwargs[f.name] = _check_type(value, hints[f.name], f"{where} {f.name}")
    return cls(**kwargs)


def _check_type(value: Any, expected: Any, where: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (str, int, float, bool):
        if type(value) is not expected:
            raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
        return value
    if get_origin(expected) is list:
        (item,) = get_args(expected)
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{where}: expected a list of {item.__name__}")
        return value
    raise ConfigError(f"{where}: unsupported type")  # pragma: no cover - a bug in the dataclasses


def _from_env(text: str, expected: Any, where: str) -> Any:
    try:
        if expected is int:
            return int(text)
        if expected is float:
            return float(text)
        if expected is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
    except ValueError:
        raise ConfigError(f"{where}: cannot read {text!r} as {expected.__name__}") from None
    if isinstance(expected, types.GenericAlias):
        raise ConfigError(f"{where}: lists cannot be set from the environment")
    return text
