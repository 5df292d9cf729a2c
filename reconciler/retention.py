"""Retention of the router DB: jobs that ended long ago go, with their audit rows; active jobs never.

``python -m reconciler db prune --older-than 30d`` does it once (``--dry-run`` counts);
:meth:`router_db.RouterDB.prune_finished` does the deleting, a small batch a transaction.
"""

from __future__ import annotations

import re
from datetime import timedelta

_AGE = re.compile(r"(\d{1,9})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m`` or ``3600s``; ValueError naming the accepted forms otherwise."""
    found = _AGE.fullmatch(text.strip())
    if found is None or int(found.group(1)) == 0:
        raise ValueError(f"{text!r} is not an age such as 30d, 12h, 90m or 3600s")
    return timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
