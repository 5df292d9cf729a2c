"""Fixes of the core, reverted one at a time: each names a defect the simulation must find.

``with reverted("forgotten-job"): play(seed)`` plays a world on the core as it was before that fix.
tests/test_simulation.py and ``python -m bench.simulate --revert NAME`` use them; bench/RESULTS.md
records how many worlds each took to find.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from agent_api.client import JobInfo
from reconciler.core import agent_reports, decision, loop, targeted
from router_db import JobRecord


async def _never_forgotten(*args: Any) -> tuple[list[JobRecord], list[JobInfo], bool]:
    return [], [], True


def _forgotten_job() -> list[tuple[object, str, object]]:
    """World defect 3: an agent that no longer knows a RUNNING job (recreated with an empty home)
    leaves it RUNNING: its task hangs."""
    return [(agent_reports, "confirm_unknown", _never_forgotten)]


def _count_surplus() -> list[tuple[object, str, object]]:
    """World defect 5: a count above what the targeted read knows is taken as explained, so a
    deferred task instance it does not watch hides a drop until the rolling full check."""
    likely = targeted.TargetedRead._likely

    async def explained(self: targeted.TargetedRead, cycle: Any, difference: int, *rest: Any) -> Any:
        if difference > 0:
            return 0, rest[0]
        return await likely(self, cycle, difference, *rest)

    return [(targeted.TargetedRead, "_likely", explained)]


def _outage_recheck() -> list[tuple[object, str, object]]:
    """A read that failed does not start the full check over: a task cleared and run again while
    Airflow gave no answer keeps its old try's job until the next round (full_resync_seconds)."""
    return [(targeted.TargetedRead, "missed", lambda self: None)]


def _widened_lists() -> list[tuple[object, str, object]]:
    """New ids in the read's lists bring unseen deferred task instances into the count unread."""

    async def unread(self: targeted.TargetedRead, watched: Any) -> None:
        return None

    return [(targeted.TargetedRead, "_widened", unread)]


def _agents_inline() -> list[tuple[object, str, object]]:
    """Each cycle waits for its round with the agents: a silent agent delays every read of Airflow."""
    cycle = loop.ReconcileLoop.cycle

    async def inline(self: loop.ReconcileLoop, *, dry_run: bool = False, agents_apart: bool = False) -> Any:
        return await cycle(self, dry_run=dry_run, agents_apart=False)

    return [(loop.ReconcileLoop, "cycle", inline)]


def _deferred_is_failed() -> list[tuple[object, str, object]]:
    """Not a fix taken out but a wrong decision table (a deferred task instance taken for a failed
    one): the no-false-stop invariant, whose oracle is written apart from the table, must catch it."""
    return [
        (decision, "KEEP_STATES", decision.KEEP_STATES - {"deferred"}),
        (decision, "FAILED_STATES", decision.FAILED_STATES | {"deferred"}),
    ]


MUTANTS: dict[str, Callable[[], Sequence[tuple[object, str, object]]]] = {
    "forgotten-job": _forgotten_job,
    "count-surplus": _count_surplus,
    "outage-recheck": _outage_recheck,
    "widened-lists": _widened_lists,
    "agents-inline": _agents_inline,
    "deferred-is-failed": _deferred_is_failed,
}


@contextlib.contextmanager
def reverted(name: str) -> Iterator[None]:
    """The core with the fix ``name`` (a key of :data:`MUTANTS`) taken out, while the block runs."""
    patches = MUTANTS[name]()
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, replacement in patches:
            setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
