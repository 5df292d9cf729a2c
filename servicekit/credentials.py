"""Secrets for both services: read from an environment variable or a file, never from TOML.

A token setting may hold several tokens separated by commas or whitespace (so a token cannot contain
those): that is how a token is rotated without a moment in which clients are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from servicekit.config import ConfigError


def split_tokens(text: str) -> tuple[str, ...]:
    """The tokens in ``text``, separated by commas or whitespace, in order, without duplicates."""
    return tuple(dict.fromkeys(token for token in re.split(r"[,\s]+", text) if token))


def read_secret(
    what: str, *, env_name: str, file: str | Path | None, env: Mapping[str, str], file_key: str = "token_file"
) -> str:
    """The secret in ``file`` (when set) or in the environment variable ``env_name``; the error names
    ``what`` and where it looked (``file_key``: the setting that named the file), never a value."""
    if file:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{what}: {file_key} {file}: cannot read: {reason}") from None
        if not value:
            raise ConfigError(f"{what}: {file_key} {file} is empty")
        return value
    value = env.get(env_name, "")  # as given: a password may begin or end with a space
    if not value.strip():
        raise ConfigError(f"{what}: environment variable {env_name} is empty or unset")
    return value


def read_tokens(
    what: str, *, env_name: str, file: str | Path | None, env: Mapping[str, str], file_key: str = "token_file"
) -> tuple[str, ...]:
    """Every token in the secret: at least one."""
    text = read_secret(what, env_name=env_name, file=file, env=env, file_key=file_key)
    tokens = split_tokens(text)
    if not tokens:
        where = f"{file_key} {file}" if file else f"environment variable {env_name}"
        raise ConfigError(f"{what}: {where} is empty: no token in it")
    return tokens
