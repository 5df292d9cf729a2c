"""Typed configuration for both services: TOML sections, environment overrides, bounds beside defaults.

A section is a frozen dataclass whose fields are the keys, each declared with :func:`setting` so that
its default and its bounds are read together::

    @dataclass(frozen=True)
    class HttpConfig:
        port: int = setting(8790, ge=0, le=65535)

:func:`build` fills one from a TOML table and the environment (``<prefix><KEY>`` wins over the file),
checks types and bounds, and raises :class:`ConfigError` naming the key (``[http] port: ...``) and
never a value that could be a secret. Secrets never come from TOML: a key named ``token`` or
``password`` is refused with a pointer to the ``*_env``/``*_file`` keys (:mod:`servicekit.credentials`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

SECRET_KEYS = frozenset({"token", "tokens", "password"})
_INTEGER = re.compile(r"[+-]?[0-9]+")
T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem, never a secret."""


@dataclass(frozen=True)
class Bounds:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    one_of: tuple[str, ...] = ()
    nonempty: bool = False

    def problem(self, value: Any) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.ge is not None and self.le is not None and not self.ge <= value <= self.le:
                return f"must be between {_num(self.ge)} and {_num(self.le)}, got {value}"
            if self.ge is not None and value < self.ge:
                return f"must be >= {_num(self.ge)}, got {value}"
            if self.gt is not None and value <= self.gt:
                return f"must be > {_num(self.gt)}, got {value}"
            if self.le is not None and value > self.le:
                return f"must be <= {_num(self.le)}, got {value}"
        if isinstance(value, str):
            if self.one_of and value not in self.one_of:
                return f"must be one of {', '.join(self.one_of)}, got {value!r}"
            if self.nonempty and not value.strip():
                return "must be a non-empty string"
        return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    one_of: Sequence[str] = (),
    nonempty: bool = False,
    secret: bool = False,
) -> Any:
    """A configuration key: its default (none: required) and the bounds its value must meet."""
    bounds = Bounds(ge=ge, gt=gt, le=le, one_of=tuple(one_of), nonempty=nonempty)
    metadata = {"bounds": bounds}
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


def read_toml(path: Path | str) -> dict[str, Any]:
    """The TOML document at ``path``; a missing, unreadable or malformed file is a ConfigError."""
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def check_tables(document: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(document) - set(known))
    if unknown:
        listed = ", ".join(f"[{name}]" for name in known)
        raise ConfigError(f"{where}: unknown section [{unknown[0]}]; known: {listed}")


def table(document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = document.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}] must be a table")
    return section


def build(
    cls: type[T],
    values: Mapping[str, Any],
    *,
    where: str,
    env: Mapping[str, str],
    env_prefix: str | None = None,
    given: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """One section: ``values`` (a TOML table), overridden by ``<env_prefix><KEY>`` variables.

    ``given`` supplies fields that are not read from TOML or the environment (loaded secrets);
    ``defaults`` are defaults computed at run time (the host name), used when neither gives the key.
    """
    given = given or {}
    for key in values:
        if key in SECRET_KEYS:
            raise ConfigError(
                f"{where} {key}: must not be in the config file; set it in the environment "
                f"({key}_env) or in a file ({key}_file)".replace("tokens_", "token_")
            )
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    readable = [name for name in fields if name not in given]
    unknown = sorted(set(values) - set(readable))
    if unknown:
        raise ConfigError(f"{where} {unknown[0]}: unknown key; known: {', '.join(readable)}")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = dict(given)
    for name in readable:
        f = fields[name]
        label = f"{where} {name}"
        env_name = f"{env_prefix}{name}".upper() if env_prefix is not None else None
        if env_name is not None and env_name in env:
            label = f"{label} (from {env_name})"
            value = from_text(env[env_name], hints[name], label)
        elif name in values:
            value = _typed(values[name], hints[name], label)
        elif defaults is not None and name in defaults:
            value = defaults[name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{label}: required")
        else:
            continue
        bounds: Bounds | None = f.metadata.get("bounds")
        problem = bounds.problem(value) if bounds is not None else None
        if problem is not None:
            raise ConfigError(f"{label}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


def _optional(expected: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    if get_origin(expected) in (types.UnionType, Union):
        args = [a for a in get_args(expected) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _typed(value: Any, expected: Any, label: str) -> Any:
    inner = _optional(expected)
    if inner is not None:
        return _typed(value, inner, label)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{label}: expected a path (a string), got {type(value).__name__}")
        if not value.strip():
            raise ConfigError(f"{label}: must be a non-empty path")
        return Path(value).expanduser()
    if expected in (str, int, float, bool):
        if type(value) is not expected:
            raise ConfigError(f"{label}: expected {expected.__name__}, got {type(value).__name__}")
        return value
    if get_origin(expected) is list:
        (item,) = get_args(expected)
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{label}: expected a list of {item.__name__}")
        return value
    raise ConfigError(f"{label}: unsupported type")  # pragma: no cover - a bug in the dataclasses


def from_text(text: str, expected: Any, label: str) -> Any:
    """A value given as text (an environment variable) read as ``expected``."""
    inner = _optional(expected)
    if inner is not None:
        return from_text(text, inner, label)
    try:
        if expected is int:
            if not _INTEGER.fullmatch(
                text.strip()
            ):  # int() would also take "1_000" and other scripts' digits
                raise ValueError(text)
            return int(text.strip())
        if expected is float:
            return float(text.strip())
        if expected is bool:
            if text.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.strip().lower() in ("true", "1")
    except ValueError:
        raise ConfigError(f"{label}: must be {_kind(expected)}") from None
    if get_origin(expected) is list and get_args(expected) == (str,):
        return [item.strip() for item in text.split(",") if item.strip()]  # "gpu,large"
    if get_origin(expected) is list:
        raise ConfigError(f"{label}: lists cannot be set from the environment")
    return _typed(text, expected, label)


def _kind(expected: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        expected, getattr(expected, "__name__", str(expected))
    )
