"""Retention of the router DB: jobs that ended long ago go, with their audit rows; active jobs never.

The leader does it every hour (:func:`prune_periodically`, ``[retention] keep_days``);
``python -m reconciler db prune --older-than 30d`` does it once (``--dry-run`` counts).
:meth:`router_db.RouterDB.prune_finished` does the deleting, a small batch a transaction, so the
loop's and the API's own writes never wait long behind it. Ages are measured on the router DB's clock,
the one every replica writes ``updated_at`` with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from router_db import RouterDB

log = logging.getLogger("reconciler.core.retention")
PRUNE_EVERY_SECONDS = 3600.0
PRUNE_BATCH = 500

_AGE = re.compile(r"(\d{1,9})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m`` or ``3600s``; ValueError naming the accepted forms otherwise."""
    found = _AGE.fullmatch(text.strip())
    if found is None or int(found.group(1)) == 0:
        raise ValueError(f"{text!r} is not an age such as 30d, 12h, 90m or 3600s")
    return timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})


async def prune_periodically(
    db: RouterDB, *, keep_days: float, stopping: asyncio.Event, every: float = PRUNE_EVERY_SECONDS
) -> None:
    """While this replica leads: at once, then every ``every`` seconds, delete the jobs that ended more
    than ``keep_days`` ago (0: never). A failing database is logged and tried again next time."""
    if keep_days <= 0:
        return
    while not stopping.is_set():
        try:
            # A job's updated_at is the router DB's time, whichever replica wrote it: so is the cut-off.
            before = await asyncio.to_thread(db.now) - timedelta(days=keep_days)
            count = await asyncio.to_thread(db.prune_finished, before, batch=PRUNE_BATCH)
        except SQLAlchemyError as exc:
            log.warning("retention: router DB unusable, retrying later: %s", type(exc).__name__)
        else:
            if count:
                moment = before.isoformat(timespec="seconds")
                log.info("retention: deleted %d job(s) that ended before %s", count, moment)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), every)
