"""The agent's configuration: one typed, frozen object read from TOML and the environment.

Keys live in the ``[agent]`` table of the TOML file (see ``config/agent.toml``). Every key can be
overridden by an environment variable ``AGENTIC_AGENT_<KEY>`` (``AGENTIC_AGENT_PORT=9000``), which wins
over the file. Error messages name the key and the problem, never a token.

Tokens are secrets and never come from the TOML: they are read from the environment variable named by
``token_env`` (default ``AGENTIC_AGENT_TOKEN``) or, if ``token_file`` is set, from that file. Either may
hold several tokens, separated by commas, spaces or newlines (so a token cannot contain those); a
request carrying any of them is accepted. That is how a token is rotated without a moment in which
clients are refused: add the new token next to the old one and restart the agent (running jobs are
adopted), move the clients to the new token, then remove the old one and restart again.

TLS: with ``tls_cert_file`` and ``tls_key_file`` (PEM; both or neither) the agent serves HTTPS only.
Both files are loaded when the configuration is, so a missing, unreadable or mismatched file is a
:class:`ConfigError` at start, not a failure on the first connection.
"""

from __future__ import annotations

import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servicekit.tls import server_context

ENV_PREFIX = "AGENTIC_AGENT_"
DEFAULT_TOKEN_ENV = "AGENTIC_AGENT_TOKEN"
DEFAULT_HOME = Path("/var/lib/agentic-agent")


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class AgentConfig:
    id: str
    home: Path  # job state: <home>/jobs/<job_id>/{state.json,output.log,...}
    tokens: tuple[str, ...] = field(repr=False)  # every token a request may carry (rotation: old + new)
    host: str = "127.0.0.1"
    port: int = 8791
    token_env: str = DEFAULT_TOKEN_ENV
    token_file: Path | None = None
    grace_seconds: float = 10.0  # SIGTERM -> SIGKILL
    max_body_bytes: int = 1024 * 1024
    poll_seconds: float = 0.5  # how often running jobs are checked (exit, descendants, timeout)
    tls_cert_file: Path | None = None  # PEM certificate chain; with tls_key_file, the agent serves HTTPS
    tls_key_file: Path | None = None  # PEM private key, unencrypted (protect it with file permissions)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file is not None else "http"

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context to serve with, or None for plain HTTP; raises ConfigError naming the file."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        try:
            return server_context(self.tls_cert_file, self.tls_key_file)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# key -> (parser of a TOML/env value, default); the parser raises ConfigError naming the key.
_Parser = Callable[[str, object], object]


def _as_str(key: str, value: object) -> object:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


def _as_path(key: str, value: object) -> object:
    return Path(str(_as_str(key, value))).expanduser()


def _as_int(low: int, high: int) -> _Parser:
    def parse(key: str, value: object) -> object:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: must be an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise ConfigError(f"{key}: must be between {low} and {high}, got {value}")
        return value

    return parse


def _as_seconds(minimum: float, *, inclusive: bool) -> _Parser:
    def parse(key: str, value: object) -> object:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: must be a number of seconds") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number of seconds, got {type(value).__name__}")
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < minimum or (not inclusive and seconds == minimum):
            bound = ">=" if inclusive else ">"
            raise ConfigError(f"{key}: must be a finite number {bound} {minimum}, got {value}")
        return seconds

    return parse


_KEYS: dict[str, tuple[_Parser, object]] = {
    "id": (_as_str, None),  # default: the host name
    "host": (_as_str, "127.0.0.1"),
    "port": (_as_int(1, 65535), 8791),
    "home": (_as_path, DEFAULT_HOME),
    "token_env": (_as_str, DEFAULT_TOKEN_ENV),
    "token_file": (_as_path, None),
    "grace_seconds": (_as_seconds(0.0, inclusive=True), 10.0),
    "max_body_bytes": (_as_int(1024, 1024 * 1024 * 1024), 1024 * 1024),
    "poll_seconds": (_as_seconds(0.0, inclusive=False), 0.5),
    "tls_cert_file": (_as_path, None),
    "tls_key_file": (_as_path, None),
}


def load_config(path: Path | str | None, *, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read ``[agent]`` from ``path`` (None: defaults only), apply env overrides, load the token."""
    env = os.environ if environ is None else environ
    raw = _read_toml(Path(path)) if path is not None else {}
    values: dict[str, Any] = {}
    for key, (parse, default) in _KEYS.items():
        env_name = ENV_PREFIX + key.upper()
        if env_name in env:
            values[key] = parse(f"{key} (from {env_name})", env[env_name])
        elif key in raw:
            values[key] = parse(key, raw[key])
        else:
            values[key] = default
    values["id"] = values["id"] or socket.gethostname()
    if (values["tls_cert_file"] is None) != (values["tls_key_file"] is None):
        raise ConfigError("tls_cert_file, tls_key_file: set both (to serve HTTPS) or neither")
    tokens = _load_tokens(values["token_env"], values["token_file"], env)
    config = AgentConfig(tokens=tokens, **values)
    config.server_ssl_context()  # fail now, with the key's name, not on the first connection
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown_tables = sorted(set(document) - {"agent"})
    if unknown_tables:
        raise ConfigError(f"{path}: unknown top-level keys {unknown_tables}; the agent reads only [agent]")
    section = document.get("agent", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: agent must be a table ([agent])")
    if "token" in section:
        raise ConfigError(
            "token: must not be in the config file; "
            "set it in the environment (token_env) or in a file (token_file)"
        )
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) in [agent]: {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    return section


def _load_tokens(token_env: str, token_file: Path | None, env: Mapping[str, str]) -> tuple[str, ...]:
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"token_file: cannot read {token_file}: {reason}") from None
        tokens = _split_tokens(text)
        if not tokens:
            raise ConfigError(f"token_file: {token_file} is empty")
        return tokens
    tokens = _split_tokens(env.get(token_env, ""))
    if not tokens:
        raise ConfigError(f"token: environment variable {token_env} is not set or empty (or set token_file)")
    return tokens


def _split_tokens(text: str) -> tuple[str, ...]:
    """The tokens in ``text``, separated by commas or whitespace, in order, without duplicates."""
    return tuple(dict.fromkeys(token for token in re.split(r"[,\s]+", text) if token))
