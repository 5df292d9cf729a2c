"""One JSON object per log line, for both services: what a log pipeline parses without a grok pattern.

Fields passed with ``extra=`` (a job's ids, an agent's id) become fields of the line; the standard
attributes of a log record stay out. Never log a token: nothing here can tell one from other text.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# A record's own attributes; anything else on it came through ``extra=`` and goes into the line.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                line.setdefault(name, value)  # an extra never overwrites ts, level, logger or msg
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str = "INFO", *, access_log: bool = False) -> None:
    """JSON lines on stderr for every logger; aiohttp's access log only if asked (a busy API's
    access log drowns everything else: the sidecar answers every trigger's poll)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if access_log else logging.WARNING)
