"""Secrets for both services: read from an environment variable or a file, never from TOML.

A token setting may hold several tokens separated by commas or whitespace (so a token cannot contain
those): that is how a token is rotated without a moment in which clients are refused.

A secret read from a file follows the file while the service runs (:class:`Secret`, :func:`follow`):
rotating a token needs no restart. One from an environment variable cannot change: a process's
environment is fixed when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from servicekit.config import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_SECONDS = 1.0  # how often secret files are looked at: one stat each, read only when changed


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


def token_list(text: str) -> tuple[str, ...]:
    """A file's tokens (:func:`split_tokens`); ``ValueError`` when it holds none."""
    tokens = split_tokens(text)
    if not tokens:
        raise ValueError("is empty: no token in it")
    return tokens


def one_secret(text: str) -> str:
    """A file's secret, surrounding whitespace removed; ``ValueError`` when it is empty."""
    value = text.strip()
    if not value:
        raise ValueError("is empty")
    return value


class Secret(Generic[T]):
    """A secret as it is now: callers ask :meth:`current` at each use and keep no copy.

    One given a ``file`` follows it: :meth:`refresh` reads the file again once its identity changes
    (device, inode, size, modification and change times of the file the path resolves to), which
    Kubernetes' atomic swap of a mounted Secret's ``..data`` link does as well as an edit in place. A
    file that is missing, empty or unreadable meanwhile (half-way through a rotation or an edit) keeps
    the last good value, with a warning; no log line holds the value.
    """

    def __init__(
        self,
        value: T,
        *,
        what: str = "secret",
        file: Path | None = None,
        parse: Callable[[str], T] | None = None,
        seen: tuple[int, ...] | None = None,
    ) -> None:
        if file is not None and parse is None:
            raise ValueError("a secret file needs a parser")
        self.what = what
        self.file = file
        self._value = value
        self._parse = parse
        self._seen = seen  # the file's identity when last read; None: read it at the first refresh
        self._problem: str | None = None  # the last warning, so a file that stays missing warns once

    def __repr__(self) -> str:
        return f"Secret({self.what!r}, file={self.file!r})"  # never the value

    def current(self) -> T:
        return self._value

    def refresh(self, *, force: bool = False) -> bool:
        """Read the file again if it changed (or if ``force``); True when the value changed. Blocking
        (a stat, and a read when it changed): call it from a worker thread."""
        if self.file is None or self._parse is None:
            return False
        try:
            seen = file_identity(self.file)
            if seen == self._seen and not force and self._problem is None:
                return False
            value = self._parse(self.file.read_text(encoding="utf-8"))
        except OSError as exc:
            return self._keep(f"cannot read: {exc.strerror or type(exc).__name__}")
        except UnicodeDecodeError:
            return self._keep("is not UTF-8 text")
        except ValueError as exc:
            return self._keep(str(exc))
        self._seen = seen
        if self._problem is not None:
            self._problem = None
            if value == self._value:
                log.info("%s: %s is readable again, unchanged", self.what, self.file)
        if value == self._value:
            return False
        self._value = value
        log.info("%s: reloaded from %s", self.what, self.file, extra={"action": "secret_reloaded"})
        return True

    def _keep(self, problem: str) -> bool:
        if problem != self._problem:
            self._problem = problem
            log.warning(
                "%s: %s %s; keeping the last good value",
                self.what,
                self.file,
                problem,
                extra={"action": "secret_kept"},
            )
        return False


class View(Secret[T]):
    """A value made from other secrets as they are now (the tokens an agent accepts: its own and its
    fleet's; the one token sent to registered agents): made again whenever one of them changes."""

    def __init__(self, what: str, parts: Sequence[Secret[Any]], make: Callable[..., T]) -> None:
        self._parts = tuple(parts)
        self._make = make
        self._inputs = tuple(part.current() for part in self._parts)
        super().__init__(make(*self._inputs), what=what)

    def current(self) -> T:
        inputs = tuple(part.current() for part in self._parts)
        if any(new is not old for new, old in zip(inputs, self._inputs, strict=True)):
            self._inputs, self._value = inputs, self._make(*inputs)
        return self._value


def file_identity(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced or written (``OSError`` when it cannot be looked at)."""
    st = os.stat(path)  # follows links: Kubernetes swaps the ..data link, not the file's own name
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load_tokens(
    what: str, *, env_name: str, file: str | Path | None, env: Mapping[str, str], file_key: str = "token_file"
) -> Secret[tuple[str, ...]]:
    """:func:`read_tokens`, kept current with their file (if any) by :func:`follow`."""
    seen = _identity_before_read(file)
    tokens = read_tokens(what, env_name=env_name, file=file, env=env, file_key=file_key)
    return Secret(tokens, what=what, file=Path(file) if file else None, parse=token_list, seen=seen)


def load_secret(
    what: str, *, env_name: str, file: str | Path | None, env: Mapping[str, str], file_key: str = "token_file"
) -> Secret[str]:
    """:func:`read_secret`, kept current with its file (if any) by :func:`follow`."""
    seen = _identity_before_read(file)
    value = read_secret(what, env_name=env_name, file=file, env=env, file_key=file_key)
    return Secret(value, what=what, file=Path(file) if file else None, parse=one_secret, seen=seen)


def _identity_before_read(file: str | Path | None) -> tuple[int, ...] | None:
    # Taken before the read: a change landing between the two is seen at the first refresh.
    if not file:
        return None
    try:
        return file_identity(Path(file))
    except OSError:
        return None  # the read reports it


async def follow(secrets: Iterable[Secret[Any]], *, period: float = POLL_SECONDS) -> None:
    """Keep ``secrets`` in step with their files until cancelled: each file is looked at every
    ``period`` seconds, and read again at once on SIGHUP (whether or not it looks changed)."""
    files = [secret for secret in secrets if secret.file is not None]
    loop = asyncio.get_running_loop()
    hangup = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
    except (RuntimeError, ValueError):  # not the main thread (an embedded test server): polling only
        pass
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hangup.wait(), period)
            forced = hangup.is_set()
            hangup.clear()
            if forced:
                log.info(
                    "SIGHUP: reading %d secret file(s) again%s",
                    len(files),
                    "" if files else " (secrets from the environment change only with a restart)",
                )
            if files:
                await asyncio.to_thread(_refresh, files, force=forced)
    finally:
        with contextlib.suppress(RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)


def _refresh(files: list[Secret[Any]], *, force: bool) -> None:
    for secret in files:
        try:
            secret.refresh(force=force)
        except Exception:  # a bug must not end the watching of every other file
            log.exception("%s: checking %s failed", secret.what, secret.file)
