"""docs/configuration.md is generated from the typed configuration and config/*.toml, and stays so."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent import config as agent_config
from harness.config_reference import (
    CONFIG_DIR,
    FALLBACK_DOCS,
    REGENERATE,
    Comments,
    DocsError,
    Key,
    agent_keys,
    documented,
    read_comments,
    reconciler_keys,
    render,
)
from reconciler import config as reconciler_config

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"


def known(keys: list[Key]) -> dict[str, set[str]]:
    tables: dict[str, set[str]] = {}
    for key in keys:
        tables.setdefault(key.table, set()).add(key.name)
    return tables


@pytest.mark.fast
def test_the_reference_is_up_to_date() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(), f"stale: run `{REGENERATE}`"


def test_the_documented_command_prints_the_reference() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness.config_reference"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == REFERENCE.read_text(encoding="utf-8")


@pytest.mark.fast
def test_the_reference_documents_exactly_the_keys_the_services_accept() -> None:
    with pytest.raises(agent_config.ConfigError, match="unknown key; known: ") as refused:
        _agent_refuses_bogus()
    accepted = str(refused.value).split("known: ", 1)[1].split(", ")
    assert {k.name for k in agent_keys()} == set(accepted)
    sections = {f.name for f in dataclasses.fields(reconciler_config.ReconcilerConfig)}
    assert {k.table for k in reconciler_keys()} == sections
    text = REFERENCE.read_text(encoding="utf-8")
    for key in reconciler_keys() + agent_keys():
        assert f'<a id="{key.table}-{key.name}"></a>' in text, key
        if key.env:
            assert f"`{key.env}`" in text


@pytest.mark.fast
def test_the_example_files_show_the_codes_defaults() -> None:
    example = tomllib.loads((CONFIG_DIR / "reconciler.toml").read_text(encoding="utf-8"))
    defaults = reconciler_config.ReconcilerConfig()
    for section, values in example.items():
        if section == "agents":
            continue
        default = getattr(defaults, section)
        for key, value in values.items():
            assert value == getattr(default, key), f"config/reconciler.toml [{section}] {key}"
    agent_example = tomllib.loads((CONFIG_DIR / "agent.toml").read_text(encoding="utf-8"))["agent"]
    code = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(agent_config.AgentConfig)
    }
    code["home"] = agent_config.DEFAULT_HOME  # computed defaults: the home directory, the host name
    for key, value in agent_example.items():
        expected = str(code[key]) if isinstance(code[key], Path) else code[key]
        assert value == expected, f"config/agent.toml {key}"


@pytest.mark.fast
def test_every_key_has_a_comment_in_the_example_files() -> None:
    rkeys, akeys = reconciler_keys(), agent_keys()
    rc = read_comments(CONFIG_DIR / "reconciler.toml", known(rkeys))
    ac = read_comments(CONFIG_DIR / "agent.toml", known(akeys))
    for key in rkeys:
        if key.table == "agents":
            assert (key.table, key.name) in rc.keys, f"[[agents]] {key.name} is not in the example"
            continue
        assert rc.keys.get((key.table, key.name)), f"[{key.table}] {key.name}: no comment in config/"
    for key in akeys:
        assert ac.keys.get(("agent", key.name)), f"[agent] {key.name}: no comment in config/agent.toml"
    assert set(FALLBACK_DOCS) <= {("agents", k.name) for k in rkeys if k.table == "agents"}


@pytest.mark.fast
def test_a_key_nobody_described_stops_the_generator() -> None:
    with pytest.raises(DocsError, match=r"\[poll\] interval_seconds"):
        documented([k for k in reconciler_keys() if k.table == "poll"], Comments())


@pytest.mark.fast
def test_comments_attach_to_the_key_below_and_run_on_to_its_neighbour(tmp_path: Path) -> None:
    example = tmp_path / "x.toml"
    example.write_text(
        "# The file.\n\n[agent]\n# Said of host.\n#   indented detail\nhost = 'a'\nport = 1\n\n"
        "# Said of id.\n# id = 'vm'\n# Not a key: id = 'x'\n"
    )
    found = read_comments(example, {"agent": {"host", "port", "id"}})
    assert found.intro == ["The file."]
    assert found.keys[("agent", "host")] == ["Said of host.", "  indented detail"]
    assert found.keys[("agent", "port")] == found.keys[("agent", "host")]
    assert found.keys[("agent", "id")] == ["Said of id."]


def described() -> dict[tuple[str, str], str]:
    """Every key's description as the reference prints it, by (table, key)."""
    rkeys, akeys = reconciler_keys(), agent_keys()
    keys = documented(rkeys, read_comments(CONFIG_DIR / "reconciler.toml", known(rkeys)))
    keys += documented(akeys, read_comments(CONFIG_DIR / "agent.toml", known(akeys)))
    return {(k.table, k.name): " ".join(k.doc) for k in keys}


@pytest.mark.fast
def test_each_env_and_file_key_is_described_from_its_own_key() -> None:
    """A `_file` key says it names a file, an `_env` key that it names an environment variable, and no
    `_file` key repeats its `_env` sibling's description (or any other key's)."""
    docs = described()
    pairs = 0
    for (table, name), doc in docs.items():
        where = f"[{table}] {name}"
        if name.endswith("_env"):
            assert "environment variable" in doc.lower(), (
                f"{where}: does not say it names an environment variable"
            )
        if not name.endswith("_file"):
            continue
        assert re.search(r"\bfile\b", doc, re.IGNORECASE), f"{where}: does not say it names a file"
        sibling = docs.get((table, name.removesuffix("_file") + "_env"))
        if sibling is not None:
            pairs += 1
            assert doc != sibling, f"{where}: repeats the description of {name.removesuffix('_file')}_env"
        same = [other for other, text in docs.items() if text == doc and other != (table, name)]
        assert not same, f"{where}: the same description as {same}"
    assert pairs >= 7, pairs  # password, [http] token and viewer token, fleet (both sides), agents' tokens


@pytest.mark.fast
def test_a_file_key_never_borrows_its_env_siblings_comment(tmp_path: Path) -> None:
    example = tmp_path / "x.toml"
    example.write_text(
        "[airflow]\n# Environment variable holding it.\npassword_env = 'P'\npassword_file = ''\n"
    )
    found = read_comments(example, {"airflow": {"password_env", "password_file"}})
    assert found.keys[("airflow", "password_env")] == ["Environment variable holding it."]
    assert not found.keys[("airflow", "password_file")]
    keys = [k for k in reconciler_keys() if k.table == "airflow" and k.name.startswith("password_")]
    with pytest.raises(DocsError, match=r"\[airflow\] password_file"):
        documented(keys, found)


@pytest.mark.fast
def test_the_fleet_token_keys_give_the_rotation_order() -> None:
    """The fleet token is a bootstrap token: its keys on both sides give the three steps in order."""
    docs = described()
    order = "sidecar old,new; agents new; sidecar new"
    for key in [("fleet", "registration_token_env"), ("agent", "router_token_env")]:
        assert order in docs[key], f"[{key[0]}] {key[1]}: no rotation order"
        assert "troubleshooting.md#rotating-the-fleet-token" in docs[key]


def _agent_refuses_bogus() -> None:
    """Load an agent config holding one key no version has: the error lists the keys it accepts."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_text("[agent]\nno_such_key = 1\n", encoding="utf-8")
        agent_config.load_config(path, environ={"AGENTIC_AGENT_TOKEN": "t"})
