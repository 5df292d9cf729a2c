"""Settings that must agree: rules between keys that no single key's bounds can state.

A service lists its rules once (each names its keys, says itself in words and says why: the promise
that one key's value would make false). Its loader refuses a configuration that breaks any of them,
naming every broken rule at once, and the configuration reference prints the same list. A rule reads
the settings through ``value``: a setting's value by its name as the rule writes it (``"[poll]
interval_seconds"``), so the rules are data and each is checked the same way.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Value = Callable[[str], Any]  # a setting's value by its name, "[table] key"

_RELATIONS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "<": ("below", operator.lt),
    "<=": ("at most", operator.le),
    ">": ("above", operator.gt),
    ">=": ("at least", operator.ge),
}


@dataclass(frozen=True)
class Agreement:
    keys: tuple[str, ...]  # every key the rule reads, "[table] key"
    rule: str  # the rule in words, naming its keys
    why: str  # what breaks when it does not hold
    holds: Callable[[Value], bool]

    def problem(self, value: Value) -> str | None:
        """None when the rule holds; else the rule, the numbers it compared, and why it matters."""
        if self.holds(value):
            return None
        numbers = [value(key) for key in self.keys]
        shown = all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
        here = f" (here {' and '.join(_num(n) for n in numbers)})" if shown else ""
        return f"{self.rule}{here}: {self.why}"


def compare(first: str, relation: str, second: str, *, why: str, times: float = 1.0) -> Agreement:
    """The rule ``first <relation> times * second`` between two numeric settings."""
    words, test = _RELATIONS[relation]
    scaled = f"{_num(times)} times {second}" if times != 1 else second
    return Agreement(
        keys=(first, second),
        rule=f"{first} must be {words} {scaled}",
        why=why,
        holds=lambda value: test(float(value(first)), times * float(value(second))),
    )


def broken(agreements: Sequence[Agreement], value: Value) -> list[str]:
    """Every rule the settings break, each as one line naming its keys (empty: they all hold)."""
    return [problem for rule in agreements if (problem := rule.problem(value)) is not None]


def refusal(problems: Sequence[str]) -> str:
    """The error for a configuration that breaks rules: every one of them, a line each."""
    lines = "".join(f"\n  - {problem}" for problem in problems)
    return f"settings that must agree (docs/configuration.md#settings-that-must-agree):{lines}"


def table_key(name: str) -> tuple[str, str]:
    """``"[poll] interval_seconds"`` -> ``("poll", "interval_seconds")``."""
    table, _, key = name.partition("] ")
    if not table.startswith("[") or not key:
        raise ValueError(f"not a setting's name: {name!r}")
    return table.removeprefix("["), key


def _num(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
