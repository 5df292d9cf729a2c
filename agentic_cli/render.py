"""Tables and timelines for people: plain text, fixed columns, nothing a terminal could misread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

JOB_COLUMNS = (
    ("JOB", "job_id"),
    ("STATUS", "status"),
    ("DAG", "dag_id"),
    ("TASK", "task_id"),
    ("RUN", "run_id"),
    ("TRY", "try_number"),
    ("AGENT", "agent_id"),
    ("RC", "rc"),
    ("UPDATED", "updated_at"),
)


def clean(value: object) -> str:
    """A value on one line: control characters (a terminal's escape sequences) shown, not obeyed."""
    text = "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[clean(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in lines
    )


def jobs_table(jobs: Sequence[Mapping[str, Any]]) -> str:
    if not jobs:
        return "no jobs\n"
    return table([h for h, _ in JOB_COLUMNS], [[job.get(k) for _, k in JOB_COLUMNS] for job in jobs])


def job_details(job: Mapping[str, Any]) -> str:
    fields = (
        ("job", "job_id"),
        ("status", "status"),
        ("rc", "rc"),
        ("reason", "reason"),
        ("agent", "agent_id"),
        ("dag", "dag_id"),
        ("task", "task_id"),
        ("run", "run_id"),
        ("map index", "map_index"),
        ("try", "try_number"),
        ("created", "created_at"),
        ("stop requested", "stop_requested_at"),
        ("finished", "finished_at"),
    )
    width = max(len(label) for label, _ in fields)
    return "".join(
        f"{label.ljust(width)}  {clean(job.get(key))}\n" for label, key in fields if job.get(key) is not None
    )


def timeline(events: Sequence[Mapping[str, Any]]) -> str:
    """The audit trail in time order: when, the change, who made it, why."""
    ordered = sorted(events, key=lambda e: str(e.get("at", "")))
    rows = [
        [
            e.get("at"),
            f"{e.get('old_status') or '-'} -> {e.get('new_status')}",
            e.get("source"),
            e.get("reason"),
        ]
        for e in ordered
    ]
    return table(["AT", "CHANGE", "BY", "REASON"], rows) if rows else "no events\n"


AGENT_COLUMNS = (
    ("AGENT", "agent_id"),
    ("STATE", "state"),
    ("ACTIVE", "active_jobs"),
    ("MAX", "max_jobs"),
    ("LABELS", "labels"),
    ("LAST CONTACT", "last_contact_at"),
    ("HOW", "registered"),  # registered itself, or configured in [[agents]]
    ("URL", "url"),
    ("MAINTENANCE", "maintenance"),  # who drained it, and why
)


def maintenance_cell(value: object) -> str:
    """A drain's comment and who asked for it, and when it stops what still runs."""
    if not isinstance(value, Mapping):
        return ""
    said = f"{value.get('comment') or '-'} (by {value.get('by') or '?'}"
    if value.get("stop_at"):
        said += f", stops jobs at {value['stop_at']}"
    return said + ")"


def agents_table(agents: Sequence[Mapping[str, Any]]) -> str:
    if not agents:
        return "no agents\n"

    def cell(agent: Mapping[str, Any], key: str) -> object:
        value = agent.get(key)
        if key == "labels" and isinstance(value, list):
            return ",".join(str(v) for v in value)
        if key == "max_jobs" and not value:
            return "-"  # no limit
        if key == "registered":
            return "registered" if value else "configured"
        if key == "maintenance":
            return maintenance_cell(value)
        return value

    return table([h for h, _ in AGENT_COLUMNS], [[cell(a, k) for _, k in AGENT_COLUMNS] for a in agents])
