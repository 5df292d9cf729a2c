"""What the api-servers' logged tracebacks raised: the errors behind requests that failed."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

RAISE = re.compile(r"^\s+raise ([\w.]+)")
FRAME = re.compile(r'^\s+File "(?:.*/site-packages/)?([^"]+)", line \d+')


def exceptions_logged(logs: Path) -> Counter[str]:
    """Each traceback in ``logs``/*.log counted by its innermost ``raise`` and that frame's file."""
    found: Counter[str] = Counter()
    for path in sorted(logs.glob("*.log")):
        frame = ""
        last: str | None = None
        for line in path.read_text(errors="replace").splitlines():
            if match := FRAME.match(line):
                frame = match[1]
            elif match := RAISE.match(line):
                last = f"{match[1]} in {frame}"
            elif not line.startswith((" ", "Traceback")) and last is not None:
                found[last] += 1  # the traceback ended: its last raise is the innermost one
                last = None
        if last is not None:
            found[last] += 1
    return found
