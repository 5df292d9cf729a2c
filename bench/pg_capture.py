"""Read the statements one database ran from PostgreSQL's server log, and summarise query plans.

The server logs every statement of a database once ``log_min_duration_statement = 0`` is set on it
(``ALTER DATABASE ... SET``, picked up by new connections), as ``duration: X ms  statement: SQL``
(simple protocol, e.g. psycopg2, whose parameters are already inlined) or ``duration: X ms  execute
<name>: SQL`` followed by ``DETAIL:  parameters: $1 = '...'`` (extended protocol, inlined here).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# "%m [%p] %q%u@%d " (Debian's default log_line_prefix), then the severity.
RECORD = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \w+) \[(?P<pid>\d+)\] "
    r"(?:(?P<user>[^@ ]*)@(?P<db>\S*) )?(?P<level>[A-Z]+):  (?P<msg>.*)$"
)
DURATION = re.compile(r"^duration: (?P<ms>[\d.]+) ms  (?:statement|execute [^:]*): (?P<sql>.*)$", re.S)
PARAM = re.compile(r"\$(\d+) = ('(?:[^']|'')*'|NULL)")


@dataclass
class Statement:
    pid: int
    ms: float
    sql: str

    @property
    def shape(self) -> str:
        return shape(self.sql)

    @property
    def kind(self) -> str:
        head = self.sql.lstrip().split(None, 1)[0].upper() if self.sql.strip() else ""
        return head


def shape(sql: str) -> str:
    """The statement with literals replaced, IN lists collapsed: groups repeats of one query."""
    text = re.sub(r"'(?:[^']|'')*'(::\w+)?", "?", sql)
    text = re.sub(r"\b\d+(\.\d+)?\b", "?", text)
    text = re.sub(r"\((?:\s*\?\s*,)+\s*\?\s*\)", "(?...)", text)
    return re.sub(r"\s+", " ", text).strip()


class ServerLog:
    """Follows PostgreSQL's log file from a byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def statements(self, database: str) -> list[Statement]:
        """Statements logged for ``database`` since the last mark; moves the mark to the end."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # leave a half-written last line for the next read
        self.offset += end
        found: list[Statement] = []
        pending: Statement | None = None
        for rec in _records(data[:end].decode("utf-8", "replace")):
            if rec["db"] != database:
                continue
            msg = rec["msg"]
            if rec["level"] == "DETAIL" and pending is not None and msg.startswith("parameters: "):
                pending.sql = _inline(pending.sql, msg[len("parameters: ") :])
                continue
            match = DURATION.match(msg) if rec["level"] == "LOG" else None
            if match:
                pending = Statement(int(rec["pid"]), float(match["ms"]), match["sql"])
                found.append(pending)
        return found


def _records(text: str) -> Iterator[dict[str, str]]:
    current: dict[str, str] | None = None
    for line in text.split("\n"):
        match = RECORD.match(line)
        if match:
            if current is not None:
                yield current
            current = {k: v or "" for k, v in match.groupdict().items()}
        elif current is not None:
            current["msg"] += "\n" + line
    if current is not None:
        yield current


def _inline(sql: str, params: str) -> str:
    values = {int(n): v for n, v in PARAM.findall(params)}
    return re.sub(r"\$(\d+)\b", lambda m: values.get(int(m[1]), m[0]), sql)


# --- plans -----------------------------------------------------------------------------------------

HEAP_SCANS = {"Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Parallel Seq Scan"}


@dataclass
class PlanSummary:
    execution_ms: float
    planning_ms: float
    rows_examined: int  # task_instance rows the scans read (returned + removed by filters), all loops
    access: list[str] = field(default_factory=list)  # e.g. "Seq Scan", "Index Scan using ti_dag_run"
    shared_hit: int = 0
    shared_read: int = 0
    key_lines: list[str] = field(default_factory=list)

    @property
    def uses_index(self) -> bool:
        return bool(self.access) and not any("Seq Scan" in a for a in self.access)


def summarise(plan_json: Any, plan_text: str, table: str, indexes: set[str]) -> PlanSummary:
    """Numbers from EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON), key lines from the TEXT form."""
    top = plan_json[0]
    root = top["Plan"]
    summary = PlanSummary(
        execution_ms=float(top.get("Execution Time", 0.0)),
        planning_ms=float(top.get("Planning Time", 0.0)),
        rows_examined=0,
        shared_hit=int(root.get("Shared Hit Blocks", 0)),
        shared_read=int(root.get("Shared Read Blocks", 0)),
    )
    for node in _nodes(root):
        on_table = node.get("Relation Name") == table
        index = node.get("Index Name")
        if node["Node Type"] == "Bitmap Index Scan" and index in indexes:
            summary.access.append(f"Bitmap Index Scan on {index}")
        if on_table and node["Node Type"] in HEAP_SCANS:
            loops = int(node.get("Actual Loops", 1))
            read = (
                float(node.get("Actual Rows", 0))
                + float(node.get("Rows Removed by Filter", 0))
                + float(node.get("Rows Removed by Index Recheck", 0))
            )
            summary.rows_examined += round(read * loops)
            if node["Node Type"] != "Bitmap Heap Scan":
                summary.access.append(node["Node Type"] + (f" using {index}" if index else ""))
    summary.key_lines = key_lines(plan_text, table, indexes)
    return summary


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


DETAIL = ("Index Cond", "Filter", "Rows Removed", "Recheck Cond", "Sort Method", "Heap Blocks")


def key_lines(plan_text: str, table: str, indexes: set[str]) -> list[str]:
    """The plan's first line, the nodes reading ``table`` with their conditions, sorts, and timing."""
    lines = plan_text.splitlines()
    keep: list[str] = []
    in_node = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_node = i == 0 or stripped.startswith("->")
        if is_node:
            in_node = (
                i == 0
                or f" on {table} " in stripped + " "
                or any(f" {idx} " in stripped + " " for idx in indexes)
                or "Sort" in stripped
            )
            if in_node:
                keep.append(_clip(stripped.removeprefix("-> ")))
        elif in_node and stripped.startswith(DETAIL):
            keep.append("  " + _clip(stripped))
        elif stripped.startswith("Execution Time"):
            keep.append(stripped)
    return keep


ARRAY = re.compile(r"'\{([^}]*)\}'::(\w+)\[\]")


def _clip(line: str, width: int = 200) -> str:
    """One line, long ``ANY('{a,b,...}')`` arrays shown by their length."""
    line = re.sub(r"\s+", " ", line)
    line = ARRAY.sub(
        lambda m: m[0] if m[1].count(",") < 3 else f"'{{<{m[1].count(',') + 1} values>}}'::{m[2]}[]", line
    )
    return line if len(line) <= width else line[: width - 3] + "..."
