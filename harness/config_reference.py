"""The configuration reference, generated: ``python -m harness.config_reference > docs/configuration.md``.

Keys, types, defaults and environment variables come from the typed configuration
(:mod:`reconciler.config`, :class:`agent.config.AgentConfig`); the prose comes from the comments above
each key in ``config/reconciler.toml`` and ``config/agent.toml``, the files users copy from. So the
reference cannot drift from the code, and a comment is written once. A key naming an environment
variable or a file (``*_env``, ``*_file``) is described by a comment of its own, which says which of the
two it names. ``tests/test_docs_configuration.py`` fails when ``docs/configuration.md`` is stale, when a
key has no description, or when an example file shows a value other than the code's default.

Needs a source checkout (``config/`` is not installed with the package).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from agent import config as agent_config
from reconciler import config as reconciler_config
from servicekit.config import Bounds

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
REGENERATE = "python -m harness.config_reference > docs/configuration.md"

# Keys the example files show without a comment of their own (the [[agents]] tables).
FALLBACK_DOCS = {
    ("agents", "id"): "Unique name of the agent; a job submitted with this `agent_id` goes to it.",
    ("agents", "url"): "The agent's base URL, `http://` or `https://`.",
    ("agents", "token_env"): "Environment variable holding the token this sidecar sends to the agent.",
    ("agents", "token_file"): "File holding that token; when set, it takes precedence over `token_env`.",
    ("agents", "labels"): (
        "Labels for routing: a job that asks for labels goes to the agent with the most room among those "
        "carrying all of them."
    ),
}

PHRASES = ("required", "unset", "the host name")  # defaults that are words, not TOML values
_TABLE = re.compile(r"^\[\[?\s*([A-Za-z0-9_]+)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=")
_COMMENTED_KEY = re.compile(r"^# ?([A-Za-z_][A-Za-z0-9_]*) = ")


class DocsError(Exception):
    """The example files and the typed configuration cannot be documented together."""


@dataclass(frozen=True)
class Key:
    table: str
    name: str
    type: str
    default: str  # rendered as TOML, or a phrase ("required", "the host name", "unset")
    env: str | None  # the environment variable that overrides it, if any
    doc: list[str]  # comment lines, "# " removed, indentation kept
    allowed: str = ""  # the bounds the loader applies ("> 0", "1-65535", "one of ..."), if any


@dataclass
class Comments:
    """The comments of an example TOML file: the file's header, each table's and each key's block."""

    intro: list[str] = field(default_factory=list)
    tables: dict[str, list[str]] = field(default_factory=dict)
    keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def read_comments(path: Path, known: dict[str, set[str]]) -> Comments:
    """Attach each comment block to the key below it (``# key = ...`` lines count as keys).

    A key written right below another key, with no comment or blank line between, shares that key's
    comment (``backoff_initial_seconds`` and ``backoff_max_seconds``); a blank line ends a block. A key
    naming an environment variable or a file (:func:`names_a_source`) never shares one: read with its
    ``*_env`` sibling's text, ``password_file`` told readers it was an environment variable.
    """
    found = Comments()
    table: str | None = None
    pending: list[str] = []
    previous: tuple[str, str] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        header = _TABLE.match(line)
        name = _key_name(line, known.get(table or "", set()))
        if not line:
            if table is None and pending and not found.intro:
                found.intro = pending
            pending, previous = [], None
        elif header:
            table = header.group(1)
            if pending:
                found.tables[table] = pending
            pending, previous = [], None
        elif table is not None and name is not None:
            shared = found.keys.get(previous, []) if previous and not names_a_source(name) else []
            doc = pending or shared
            found.keys.setdefault((table, name), doc)
            pending, previous = [], (table, name)
        elif line.startswith("#"):
            pending.append(re.sub(r"^# ?", "", line))
            previous = None
    return found


def names_a_source(key: str) -> bool:
    """A key whose value names where something is read from: an environment variable or a file."""
    return key.endswith(("_env", "_file"))


def _key_name(line: str, known: set[str]) -> str | None:
    """The key a line sets, or shows commented out (``# id = "vm-01"``, only for known keys)."""
    key = _KEY.match(line)
    if key:
        return key.group(1)
    commented = _COMMENTED_KEY.match(line)
    return commented.group(1) if commented and commented.group(1) in known else None


def reconciler_keys() -> list[Key]:
    """Every key of the reconciler's TOML, from :class:`reconciler.config.ReconcilerConfig` (no prose yet)."""
    keys = []
    hints = get_type_hints(reconciler_config.ReconcilerConfig)
    for section in dataclasses.fields(reconciler_config.ReconcilerConfig):
        cls = get_args(hints[section.name])[0] if section.name == "agents" else hints[section.name]
        for f in dataclasses.fields(cls):
            kind = get_type_hints(cls)[f.name]
            env = None
            if section.name != "agents" and not isinstance(kind, types.GenericAlias):
                env = f"{reconciler_config.ENV_PREFIX}{section.name}_{f.name}".upper()
            keys.append(Key(section.name, f.name, _type_name(kind), _default(f), env, [], _allowed(f)))
    return keys


def agent_keys() -> list[Key]:
    """Every key of the agent's ``[agent]`` table, from :class:`agent.config.AgentConfig`."""
    special = {"id": PHRASES[2], "home": _toml(str(agent_config.DEFAULT_HOME))}
    hints = get_type_hints(agent_config.AgentConfig)
    return [
        Key(
            "agent",
            f.name,
            _type_name(hints[f.name]),
            special.get(f.name) or _default(f),
            agent_config.ENV_PREFIX + f.name.upper(),
            [],
            _allowed(f),
        )
        for f in dataclasses.fields(agent_config.AgentConfig)
        if f.repr  # secrets (tokens, fleet_tokens) come from their _env / _file, never from the file
    ]


def documented(keys: Sequence[Key], comments: Comments) -> list[Key]:
    """``keys`` with their descriptions; :class:`DocsError` names a key that has none."""
    return [dataclasses.replace(k, doc=_doc(comments, k.table, k.name)) for k in keys]


def _doc(comments: Comments, table: str, name: str) -> list[str]:
    doc = comments.keys.get((table, name)) or []
    if not doc and (table, name) in FALLBACK_DOCS:
        doc = [FALLBACK_DOCS[(table, name)]]
    if not doc:
        raise DocsError(f"[{table}] {name}: no comment in config/ and no fallback description")
    text = " ".join(doc).lower()
    if name.endswith("_env") and "environment variable" not in text:
        raise DocsError(f"[{table}] {name}: its comment must say it names an environment variable")
    if name.endswith("_file") and re.search(r"\bfile\b", text) is None:
        raise DocsError(f"[{table}] {name}: its comment must say it names a file")
    return doc


def _type_name(kind: Any) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if isinstance(kind, types.GenericAlias):
        return f"list of {names[get_args(kind)[0]]}s"
    if isinstance(kind, types.UnionType):
        options = [names[arg] for arg in get_args(kind) if arg is not type(None)]
        return " or ".join(options) + ", optional"
    return names[kind]


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return PHRASES[1] if f.default is None else _toml(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _toml(f.default_factory())
    return PHRASES[0]


def _allowed(f: dataclasses.Field[Any]) -> str:
    """The bounds declared beside the key's default (:func:`servicekit.config.setting`), in words."""
    bounds: Bounds | None = f.metadata.get("bounds")
    if bounds is None:
        return ""
    parts = []
    if bounds.ge is not None and bounds.le is not None:
        parts.append(f"{_num(bounds.ge)} to {_num(bounds.le)}")
    elif bounds.ge is not None:
        parts.append(f">= {_num(bounds.ge)}")
    elif bounds.le is not None:
        parts.append(f"<= {_num(bounds.le)}")
    if bounds.gt is not None:
        parts.append(f"> {_num(bounds.gt)}")
    if bounds.one_of:
        parts.append("one of " + ", ".join(f"`{v}`" for v in bounds.one_of))
    if bounds.nonempty:
        parts.append("not empty")
    return "; ".join(parts)


def _num(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else str(value)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value) if isinstance(value, str | list) else repr(value)


def render() -> str:
    reconciler_file, agent_file = CONFIG_DIR / "reconciler.toml", CONFIG_DIR / "agent.toml"
    if not reconciler_file.is_file() or not agent_file.is_file():
        raise DocsError(f"no reconciler.toml and agent.toml in {CONFIG_DIR}: run from a source checkout")
    rkeys, akeys = reconciler_keys(), agent_keys()
    rc, ac = read_comments(reconciler_file, _known(rkeys)), read_comments(agent_file, _known(akeys))
    out = [
        "# Configuration reference",
        "",
        f"Generated by `{REGENERATE}` from the typed configuration",
        "(`reconciler/config.py`, `agent/config.py`) and the comments in `config/reconciler.toml` and",
        "`config/agent.toml`. Edit those, then regenerate: `tests/test_docs_configuration.py` fails while",
        "this file is stale.",
        "",
        "## Reconciler sidecar: `python -m reconciler run --config reconciler.toml`",
        "",
        *_prose(rc.intro),
        *_tables(documented(rkeys, rc), rc),
        "## Agent: `python -m agent --config agent.toml`",
        "",
        *_prose(ac.intro),
        *_tables(documented(akeys, ac), ac),
        *_agreements(),
    ]
    return "\n".join(out).rstrip() + "\n"


def _agreements() -> list[str]:
    """The rules between keys (:mod:`servicekit.agreement`), from the lists the services check."""
    out = [
        "## Settings that must agree",
        "",
        "Some promises rest on two keys at once: one key's value can make another's promise false. The",
        "sidecar and the agent check their own rules whenever they load their configuration (`run`,",
        "`check-config`): a configuration that breaks any refuses to start, exit code 2, with one line per",
        "broken rule naming both keys. Pairs that span the two services cannot be checked by either",
        "process (an agent's settings stay on its VM): keep them when configuring both.",
        "",
    ]
    groups = [
        ("Sidecar (checked at start)", reconciler_config.AGREEMENTS),
        ("Agent (checked at start)", agent_config.AGREEMENTS),
        ("Across the sidecar and its agents (not checked by either)", reconciler_config.ACROSS_SERVICES),
    ]
    for title, rules in groups:
        out += [f"### {title}", "", "| rule | why |", "|---|---|"]
        out += [f"| {_keys_in_code(rule.rule, rule.keys)} | {rule.why} |" for rule in rules]
        out.append("")
    return out


def _keys_in_code(text: str, keys: Sequence[str]) -> str:
    for key in keys:
        text = text.replace(key, f"`{key}`")
    return text


def _known(keys: Sequence[Key]) -> dict[str, set[str]]:
    known: dict[str, set[str]] = {}
    for key in keys:
        known.setdefault(key.table, set()).add(key.name)
    return known


def _tables(keys: Sequence[Key], comments: Comments) -> list[str]:
    out: list[str] = []
    for table in dict.fromkeys(k.table for k in keys):
        header = "[[agents]]" if table == "agents" else f"[{table}]"
        out += [f"### `{header}`", "", *_prose(comments.tables.get(table, []))]
        out += ["| key | type | default | allowed | environment variable |", "|---|---|---|---|---|"]
        rows = [k for k in keys if k.table == table]
        for k in rows:
            env = f"`{k.env}`" if k.env else "—"
            default = k.default if k.default in PHRASES else f"`{k.default}`"
            allowed = k.allowed or "—"
            out.append(f"| [`{k.name}`](#{table}-{k.name}) | {k.type} | {default} | {allowed} | {env} |")
        out.append("")
        for k in rows:
            out += [f'<a id="{table}-{k.name}"></a>**`{k.name}`**', "", *_prose(k.doc)]
    return out


def _prose(lines: Sequence[str]) -> list[str]:
    """Comment lines as Markdown: plain lines become paragraphs, indented runs a text block."""
    out: list[str] = []
    paragraph: list[str] = []
    block: list[str] = []

    def flush() -> None:
        if paragraph:
            out.extend([" ".join(paragraph), ""])
            paragraph.clear()
        if block:
            out.extend(["```text", *block, "```", ""])
            block.clear()

    for line in lines:
        if line.startswith("  "):
            if paragraph:
                flush()
            block.append(line)
        elif not line.strip():
            flush()
        else:
            if block:
                flush()
            paragraph.append(line.strip())
    flush()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    try:
        sys.stdout.write(render())
    except DocsError as exc:
        print(f"cannot generate the configuration reference: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
