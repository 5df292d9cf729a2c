"""A logger stand-in that keeps what it was told: for code that takes a ``log`` (the trigger's)."""

from __future__ import annotations

from typing import Any


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(("info", msg % args))

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(("warning", msg % args))

    def error(self, msg: str, *args: Any) -> None:
        self.lines.append(("error", msg % args))

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def at(self, level: str) -> list[str]:
        return [line for lvl, line in self.lines if lvl == level]
