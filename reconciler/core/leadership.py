"""One leader among replicas: the holder of a lease row in the router DB runs the poll loop.

Every replica campaigns for the lease; the winner runs the loop (a *term*) and renews every third of
the lease, by the router DB's clock. A term ends at once, its loop cancelled mid-cycle, when a renewal
is refused (another replica holds the lease) or when no renewal has succeeded for nearly a whole
lease: by then the lease may be about to pass to a standby, and two loops must never run together.
Standbys keep serving the HTTP API; only the loop is the leader's.

A replica has an identity that outlives its process (:func:`claim_identity`): ``[leader] replica_id``,
or one kept in ``[leader] state_dir`` (by default beside a SQLite router DB). While it runs, the process
holds an exclusive lock on that identity, which the kernel drops when the process dies, however it
dies. So a process that gets the lock knows every earlier process of its replica is gone, and takes
a lease one of them still holds at once (``successor_of``) instead of waiting it out: a SIGKILLed
replica restarted resumes its term, and its pending stops, within its start-up time. Two live
processes never share an identity: a second one given the same ``replica_id`` refuses to start, and
one deriving its identity takes the next free one.

The lock proves nothing beyond its own state directory and kernel: two containers or cloned VMs that
share a host name and were given one ``replica_id`` each hold a lock of their own. So the holder also
carries a *mark*: a digest of a random token kept beside the lock (made once, mode 0600, read and
written only under the lock) and of this boot's id. Only a process that has that state directory's
token, on the machine and boot of the lease's holder, takes the lease back; any other waits it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.config import REPLICA_ID_PATTERN, ConfigError, LeaderConfig
from reconciler.metrics import Metrics
from router_db import RouterDB
from router_db.leases import Leases

log = logging.getLogger("reconciler.core.leadership")

# The leader's work (the poll loop): returns once its event is set.
Term = Callable[[asyncio.Event], Coroutine[Any, Any, None]]

MAX_DERIVED = 64  # processes sharing one state directory and router DB, each with its own identity
TOKEN_PATTERN = re.compile(r"[0-9a-f]{64}")


def holder_id(lineage: str = "") -> str:
    """Unique per process, and readable in the leases table: ``<lineage><pid>:<random>`` for a replica
    with a lasting identity (:func:`predecessors`), else ``<hostname>:<pid>:<random>``."""
    process = f"{os.getpid()}:{secrets.token_hex(4)}"
    return f"{lineage}{process}" if lineage else f"{socket.gethostname()}:{process}"


def predecessors(replica_id: str, mark: str) -> str:
    """The holder prefix of this replica's processes: ``<replica id>@<hostname>:<mark>:``, where the
    mark (:func:`_mark`) proves the state directory, the machine and its boot."""
    if not mark:
        raise ValueError("a replica's processes are told apart by a mark: it cannot be empty")
    return f"{replica_id}@{socket.gethostname()}:{mark}:"


@dataclass
class Identity:
    """Who this process is among the lease's holders, and the lock that proves it alone is that one."""

    holder: str
    replica_id: str | None = None  # None: an identity of this process only (no state directory)
    lock_fd: int | None = None  # held for the process's life: the kernel releases it at exit
    mark: str = ""  # the state directory's token and this boot, digested (see _mark)

    @property
    def successor_of(self) -> str | None:
        """Earlier processes of this replica, gone since the lock is ours: their lease is ours."""
        if self.replica_id and self.mark and self.lock_fd is not None:
            return predecessors(self.replica_id, self.mark)
        return None

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def claim_identity(config: LeaderConfig, router_db_url: str) -> Identity:
    """This process's identity: ``[leader] replica_id``, or the first identity kept in the state
    directory that no live process holds (created on first use). ConfigError when the configured
    ``replica_id`` is held by a live process, or its state directory cannot be used."""
    where = config.identity_dir(router_db_url)
    if where is None:
        log.info("leader: no state directory: a restart waits out this replica's lease")
        return Identity(holder_id())
    # One router DB's lease, whatever else shares the directory (the URL is hashed, never written).
    scope = hashlib.sha256(f"{router_db_url}\0{config.lease_name}".encode()).hexdigest()[:12]
    try:
        where.mkdir(parents=True, exist_ok=True)
        if config.replica_id:
            path = where / f"leader-{scope}-{config.replica_id}.lock"
            fd = _locked(path)
            if fd is None:
                raise ConfigError(
                    f"[leader] replica_id {config.replica_id!r}: a live process holds it ({path}); two "
                    "processes with one replica id would both lead"
                )
            return _claimed(config.replica_id, fd, path)
        for n in range(1, MAX_DERIVED + 1):
            path = where / f"leader-{scope}-{n}.id"
            if (fd := _locked(path)) is not None:
                return _claimed(_kept_id(fd), fd, path)
    except OSError as exc:
        if config.replica_id:
            problem = f"[leader] state_dir: cannot keep the replica's lock in {where}: {exc}"
            raise ConfigError(problem) from None
        log.warning("leader: cannot keep an identity in %s (%s): a restart waits out the lease", where, exc)
        return Identity(holder_id())
    log.warning("leader: %d processes share %s: this one's identity lasts its life only", MAX_DERIVED, where)
    return Identity(holder_id())


def _locked(path: Path) -> int | None:
    """``path`` opened and exclusively locked, or None when a live process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kept_id(fd: int) -> str:
    """The replica id kept in the locked file, written there on first use."""
    kept = os.pread(fd, 128, 0).decode("ascii", "replace").strip()
    if REPLICA_ID_PATTERN.fullmatch(kept):
        return kept
    made = secrets.token_hex(8)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{made}\n".encode(), 0)
    os.fsync(fd)
    return made


def _claimed(replica_id: str, fd: int, path: Path) -> Identity:
    """The identity whose lock ``fd`` (on ``path``) this process holds: the token beside it is read,
    or made, only now."""
    mark = _mark(_kept_token(path.with_name(f"{path.name}.token")), _boot_id())
    log.info("leader: this process is replica %s (lock %s)", replica_id, path)
    return Identity(holder_id(predecessors(replica_id, mark)), replica_id, fd, mark)


def _kept_token(path: Path) -> str:
    """The random token kept at ``path``, made on first use (mode 0600) and kept across restarts: only
    processes of this state directory know it. The caller holds the identity's lock."""
    try:
        kept = path.read_bytes().decode("ascii", "replace").strip()
    except FileNotFoundError:
        kept = ""
    if TOKEN_PATTERN.fullmatch(kept):
        return kept
    made = secrets.token_hex(32)
    fresh = path.with_name(f"{path.name}.new")
    fresh.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode: start from none
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"{made}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(fresh, path)  # whole or not at all: a torn token would be a new one next time
    return made


def _boot_id() -> str:
    """This boot of this machine (Linux): a lock proves its holder gone only within one kernel's life,
    and a cloned VM boots with an id of its own. "" where the kernel does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _mark(token: str, boot_id: str) -> str:
    """What the holder shows of the token and the boot: a digest, so the leases table reveals neither."""
    return hashlib.sha256(f"leader-mark\0{token}\0{boot_id}".encode()).hexdigest()[:16]


class Leadership:
    def __init__(
        self,
        *,
        db: RouterDB,
        metrics: Metrics,
        config: LeaderConfig,
        holder: str | None = None,
        successor_of: str | None = None,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._config = config
        self.holder = holder or holder_id()
        self.is_leader = False
        self._held = False  # the lease may be ours in the router DB (release it on shutdown)
        # Campaigns take over a lease this replica's earlier (gone) processes still hold.
        self._successor_of = successor_of
        self._leases = Leases(db.engine) if successor_of is not None else None

    @property
    def _ttl(self) -> float:
        return self._config.lease_seconds

    @property
    def _margin(self) -> float:
        # A term ends this long before the lease could expire: room for the loop to notice.
        return min(1.0, self._ttl / 5)

    async def run(self, stopping: asyncio.Event, term: Term) -> None:
        """Campaign for the lease until ``stopping``; while it is ours, run ``term``."""
        self._metrics.leader.set(0)
        # Standbys ask often enough to take over soon after the lease expires.
        campaign_every = min(self._ttl / 3, 1.0)
        while not stopping.is_set():
            asked = time.monotonic()
            if await self._acquire(timeout=self._ttl / 3, campaign=True) is True:
                log.info("leader: lease %r taken by %s", self._config.lease_name, self.holder)
                await self._lead(stopping, term, valid_until=asked + self._ttl)
                continue
            await _wait(stopping, campaign_every)

    async def release(self) -> None:
        """Give the lease up (graceful shutdown), so that a standby takes over at once."""
        if not self._held:
            return
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self._db.release_lease, self._config.lease_name, self.holder), timeout=5
            )
            self._held = False
            log.info("leader: lease %r released", self._config.lease_name)
        except Exception as exc:  # it expires on its own
            log.warning(
                "leader: could not release the lease: %s", type(exc).__name__, extra={"error": str(exc)}
            )

    async def _lead(self, stopping: asyncio.Event, term: Term, *, valid_until: float) -> None:
        term_over = asyncio.Event()
        self.is_leader = True
        self._metrics.leader.set(1)
        task = asyncio.create_task(term(term_over), name="leader-term")
        lost = False
        renewed = time.monotonic()
        try:
            while not stopping.is_set() and not task.done():
                due = renewed + self._ttl / 3
                await _wait_any(stopping, task, max(0.0, due - time.monotonic()))
                if stopping.is_set() or task.done():
                    break
                asked = time.monotonic()
                outcome = await self._acquire(timeout=max(0.05, valid_until - self._margin - asked))
                if outcome is True:
                    renewed, valid_until = asked, asked + self._ttl
                elif outcome is False:
                    log.error(
                        "leader: lease %r taken by another replica; stopping the loop",
                        self._config.lease_name,
                    )
                    lost = True
                elif time.monotonic() >= valid_until - self._margin:
                    log.error(
                        "leader: lease %r could not be renewed in time; stopping the loop",
                        self._config.lease_name,
                    )
                    lost = True
                else:
                    renewed = time.monotonic() - self._ttl / 3 + min(0.5, self._ttl / 10)  # retry soon
                if lost:
                    break
        finally:
            term_over.set()
            if lost or not stopping.is_set():
                task.cancel()  # at once: the lease may pass to a standby within the margin
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.error("leader: the loop failed", exc_info=task.exception())
            self.is_leader = False
            self._metrics.leader.set(0)

    async def _acquire(self, *, timeout: float, campaign: bool = False) -> bool | None:
        """Take or renew the lease: True if ours, False if someone else's, None if the DB failed."""
        name, ttl = self._config.lease_name, self._config.lease_seconds
        take: Callable[[str, str, float], bool] = self._db.acquire_lease
        if campaign and self._leases is not None:
            take = functools.partial(self._leases.acquire, successor_of=self._successor_of)
        try:
            won = await asyncio.wait_for(asyncio.to_thread(take, name, self.holder, ttl), timeout=timeout)
        except Exception as exc:  # the router DB is down or slow: this replica cannot know
            log.warning("leader: lease check failed: %s", type(exc).__name__, extra={"error": str(exc)})
            self._held = True  # a late commit may still have taken it: release on shutdown regardless
            return None
        self._held = self._held or won
        return won


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)


async def _wait_any(event: asyncio.Event, task: asyncio.Task[None], timeout: float) -> None:
    waiter = asyncio.create_task(event.wait())
    try:
        await asyncio.wait([waiter, task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
