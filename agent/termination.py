"""Ending a job's process tree: SIGTERM, a grace period, then SIGKILL, until nothing is left.

The process group is signalled with ``killpg`` only while at least one verified member of the job is
still in it: a group id stays allocated while any member lives, so the group cannot have been reused.
Every member is also signalled by PID (after its start ticks are checked), which reaches processes
that left the group with ``setsid``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.process_tree import ProcessRef

_FIRST_POLL = 0.002


@dataclass(frozen=True)
class TreeOutcome:
    """How a tree ended: the strongest signal sent, and whether anything survived SIGKILL."""

    signal: signal.Signals | None
    survivors: tuple[ProcessRef, ...]


async def terminate_tree(
    members: Callable[[], set[ProcessRef]],
    *,
    pgid: int | None,
    grace: float,
    force: bool,
    poll: float = 0.05,
    kill_wait: float = 10.0,
) -> TreeOutcome:
    """SIGTERM the group and every member, SIGKILL what is left after ``grace``; wait until all are gone.

    ``members`` is called again on every poll, so processes forked during the grace period are
    signalled too. With ``force`` SIGKILL is sent at once. Returns once no member is alive, or after
    ``kill_wait`` seconds past SIGKILL with the survivors (processes stuck in uninterruptible sleep).
    The first polls come quickly and the interval doubles up to ``poll``: most trees end within a few
    milliseconds of SIGTERM, and a stop answers as soon as they are gone.
    """
    current = members()
    if not current:
        return TreeOutcome(signal=None, survivors=())
    sent = signal.SIGKILL if force else signal.SIGTERM
    _signal_all(current, pgid, sent)
    signalled = set(current)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (0.0 if force else grace)
    kill_deadline: float | None = loop.time() + kill_wait if force else None
    interval = min(poll, _FIRST_POLL)
    while True:
        await asyncio.sleep(interval)
        interval = min(poll, interval * 2)
        current = {ref for ref in members() if ref.alive()}
        if not current:
            return TreeOutcome(signal=sent, survivors=())
        if sent is signal.SIGTERM and loop.time() >= deadline:
            sent = signal.SIGKILL
            kill_deadline = loop.time() + kill_wait
            _signal_all(current, pgid, sent)
        elif current - signalled:
            _signal_all(current - signalled, pgid, sent)
        elif kill_deadline is not None and loop.time() >= kill_deadline:
            return TreeOutcome(signal=sent, survivors=tuple(sorted(current)))
        elif sent is signal.SIGKILL:
            _signal_all(current, pgid, sent)  # cheap, and catches anything that slipped through
        signalled |= current


def _signal_all(refs: Iterable[ProcessRef], pgid: int | None, sig: signal.Signals) -> None:
    refs = list(refs)
    if pgid is not None and _group_is_ours(pgid, refs):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for ref in refs:
        ref.send(sig)


def _group_is_ours(pgid: int, refs: Iterable[ProcessRef]) -> bool:
    for ref in refs:
        if not ref.exists():
            continue
        try:
            if os.getpgid(ref.pid) == pgid:
                return True
        except ProcessLookupError:
            continue
    return False
