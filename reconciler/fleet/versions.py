"""Which agent versions this sidecar works with: older ones are routed around and reported.

The lowest agent version this sidecar can send a job to is :data:`LOWEST_AGENT_VERSION`;
``[fleet] min_agent_version`` may raise it (to retire a release fleet-wide). An agent that says an
older version gets no new job: it is shown ``outdated`` (``GET /agents``, the
``reconciler_agents{state="outdated"}`` gauge, the ``AgenticAgentOutdated`` alert), its running jobs go
on and are stopped as usual, and it takes jobs again as soon as it says a version high enough (an
upgrade and restart). Nothing is set on the agent itself: an upgraded agent needs no undrain.

Versions compare by their release numbers (``1.2.10`` above ``1.2.9``); a pre-release or local part
is ignored (``1.3.0rc1`` counts as ``1.3.0``). A version that says no release number (an agent run
from a source tree never installed, ``0+unknown``, or a stand-in) and an agent that says none are not
judged: nothing is known to be wrong with them.
"""

from __future__ import annotations

import re

LOWEST_AGENT_VERSION = "0.1.0"
_RELEASE = re.compile(r"v?(\d+(?:\.\d+)*)")


def release(version: str) -> tuple[int, ...] | None:
    """The release numbers of ``version``, trailing zeros dropped (``1.2.0`` is ``1.2``); None when it
    has none, or says ``0`` only (an uninstalled checkout's ``0+unknown``)."""
    found = _RELEASE.match(version.strip())
    if found is None:
        return None
    numbers = [int(part) for part in found.group(1).split(".")]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers) or None


def too_old(version: str | None, minimum: str) -> bool:
    """Whether an agent saying ``version`` is below ``minimum`` (both as :func:`release` reads them)."""
    said = release(version) if version else None
    floor = release(minimum)
    return said is not None and floor is not None and said < floor


def minimum(configured: str) -> str:
    """The lowest agent version to work with: the configured one, never below this sidecar's own."""
    if configured and too_old(LOWEST_AGENT_VERSION, configured):
        return configured
    return LOWEST_AGENT_VERSION
