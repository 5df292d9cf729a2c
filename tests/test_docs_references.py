"""Every configuration key and command the README and docs/ name exists.

A reader copies ``[poll] agent_sync_per_cycle`` or ``python -m reconciler once --dry-run`` from the docs
into a file or a shell: a key the code does not know is ignored or refused, a flag is refused. So each
``[table] key`` in the prose, each key of a TOML example, and each ``python -m reconciler|agent`` command
line (its subcommand and flags) is checked against the typed configuration and the real argument parsers.
Tables that are Airflow's own (``[core]``, ``[triggerer]``...) are named in ``AIRFLOW_TABLES``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from harness.config_reference import agent_keys, reconciler_keys

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
AIRFLOW_TABLES = {"core", "api", "api_auth", "triggerer", "scheduler", "logging", "webserver", "database"}
# `[poll] interval_seconds`, maybe with "= value" (not "[agent] token: ...", the start of a log line)
PROSE_KEY = re.compile(r"`\[([a-z_]+)\] ([a-z_]+)(?=[`\s=])")
TOML_BLOCK = re.compile(r"```toml\n(.*?)```", re.S)
COMMAND = re.compile(r"python -m (reconciler|agent)((?: +[^\s`#|;&)]+)*)")
OURS: dict[str, set[str]] = {}
for key in [*reconciler_keys(), *agent_keys()]:
    OURS.setdefault(key.table, set()).add(key.name)

VALUED = {"--config": "x.toml", "--log-level": "INFO"}  # flags and a value each; others take none
SUBCOMMANDS = {"run": set(VALUED), "check-config": set(VALUED) | {"--connect"}}
SUBCOMMANDS["once"] = SUBCOMMANDS["run"] | {"--dry-run"}
SUBCOMMANDS["db"] = SUBCOMMANDS["run"] | {"--dry-run", "--older-than"}
VALUED["--older-than"] = "30d"
DB_ACTIONS = {"upgrade", "current", "prune"}
AGENT_FLAGS = {"--config"}


def docs_text() -> list[tuple[str, str]]:
    return [(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")) for path in DOCS]


def unknown_key(table: str, key: str) -> str | None:
    if table in AIRFLOW_TABLES:
        return None
    if table not in OURS:
        return f"[{table}] is no table of either service's configuration"
    if key not in OURS[table]:
        return f"[{table}] has no key {key!r} (it has {sorted(OURS[table])})"
    return None


def test_the_parsers_are_what_this_test_knows() -> None:
    """The subcommands and flags above are the real parsers' (asked with --help, which exits 0 once
    everything before it parsed): a new flag needs adding above."""
    from agent.__main__ import main as agent_main
    from reconciler.__main__ import main

    def parses(entry: object, argv: list[str]) -> bool:
        with pytest.raises(SystemExit) as ended:
            entry(argv)  # type: ignore[operator]
        return ended.value.code == 0

    for command, flags in SUBCOMMANDS.items():
        head = [command, *(["upgrade"] if command == "db" else [])]
        for flag in flags:
            value = [VALUED[flag]] if flag in VALUED else []
            assert parses(main, [*head, flag, *value, "--help"]), (command, flag)
    for action in DB_ACTIONS:
        assert parses(main, ["db", action, "--help"])
    assert not parses(main, ["no-such-command"])
    assert not parses(main, ["db", "downgrade"])
    assert parses(agent_main, ["--config", "x.toml", "--help"])


def test_every_key_named_in_the_prose_exists() -> None:
    wrong = [
        f"{name}: `[{table}] {key}`: {problem}"
        for name, text in docs_text()
        for table, key in PROSE_KEY.findall(text)
        if (problem := unknown_key(table, key))
    ]
    assert not wrong, "\n".join(wrong)


def test_every_key_of_a_toml_example_exists() -> None:
    wrong = []
    for name, text in docs_text():
        for block in TOML_BLOCK.findall(text):
            try:
                parsed = tomllib.loads(block)
            except tomllib.TOMLDecodeError as exc:
                wrong.append(f"{name}: a TOML example that does not parse: {exc}")
                continue
            for table, body in parsed.items():
                for entry in body if isinstance(body, list) else [body]:
                    for key in entry if isinstance(entry, dict) else []:
                        if problem := unknown_key(table, key):
                            wrong.append(f"{name}: {problem}")
    assert not wrong, "\n".join(wrong)


def test_every_command_line_names_a_real_subcommand_and_real_flags() -> None:
    wrong = []
    for name, text in docs_text():
        for service, rest in COMMAND.findall(text):
            words = [w for w in rest.split() if w not in ("...", "\\")]
            if service == "agent":
                flags = {w.split("=")[0] for w in words if w.startswith("-")}
                if flags - AGENT_FLAGS:
                    wrong.append(f"{name}: python -m agent{rest}: no flag {sorted(flags - AGENT_FLAGS)}")
                continue
            if not words or words[0].startswith("-"):
                continue  # "python -m reconciler" alone, as a name
            command, args = words[0], words[1:]
            if command not in SUBCOMMANDS:
                wrong.append(f"{name}: python -m reconciler{rest}: no subcommand {command!r}")
                continue
            if command == "db" and (not args or args[0] not in DB_ACTIONS):
                wrong.append(f"{name}: python -m reconciler{rest}: db needs one of {sorted(DB_ACTIONS)}")
            flags = {w.split("=")[0] for w in args if w.startswith("-")}
            if flags - SUBCOMMANDS[command]:
                unknown = sorted(flags - SUBCOMMANDS[command])
                wrong.append(f"{name}: python -m reconciler{rest}: no flag {unknown}")
    assert not wrong, "\n".join(wrong)


def test_the_checks_catch_a_wrong_key() -> None:
    """The key that once sent readers astray is refused (so the prose check would have failed)."""
    assert unknown_key("poll", "agent_sync_seconds") is not None
    assert unknown_key("poll", "agent_sync_per_cycle") is None
    assert unknown_key("pol", "interval_seconds") is not None
    assert unknown_key("core", "test_connection") is None  # Airflow's
