"""Settings that must agree: each rule refuses the configuration that breaks it, naming both keys.

One case per rule breaks that rule alone and then meets it at its boundary; the list of cases must cover
every rule the services declare. Real processes: the sidecar (``run``, ``check-config``) and the agent
exit 2 on a broken rule, saying which keys.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from reconciler import config as reconciler_config
from reconciler.config import ACROSS_SERVICES, AGREEMENTS, ConfigError, disagreements, parse_config
from servicekit.agreement import Agreement, broken, table_key

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"
POSTGRES_URL = "postgresql+psycopg://reconciler@db.internal:5432/router"

Raw = dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Case:
    rule: Agreement
    breaks: Raw  # the rule broken, every other rule kept
    meets: Raw  # the same keys at the rule's boundary, or otherwise made to agree


def rule(text: str) -> Agreement:
    (found,) = [r for r in AGREEMENTS if r.rule.startswith(text)]
    return found


# Defaults: lease 15, lost_after 120, check_interval 5, check_timeout 10, forget_after 86400, stop
# timeout 60, force_after 120, backoff 0.2 to 5.
SIDECAR_CASES = [
    Case(
        rule("[leader] lease_seconds"),
        {"leader": {"lease_seconds": 30}, "fleet": {"lost_after_seconds": 30}},
        {"leader": {"lease_seconds": 29.9}, "fleet": {"lost_after_seconds": 30}},
    ),
    Case(
        rule("[fleet] check_interval_seconds"),
        {"fleet": {"check_interval_seconds": 120}},
        {"fleet": {"check_interval_seconds": 119}},
    ),
    Case(
        rule("[fleet] check_timeout_seconds"),
        {"fleet": {"lost_after_seconds": 20, "check_timeout_seconds": 20.5}},
        {"fleet": {"lost_after_seconds": 20, "check_timeout_seconds": 20}},
    ),
    Case(
        rule("[fleet] forget_after_seconds"),
        {"fleet": {"forget_after_seconds": 120}},
        {"fleet": {"forget_after_seconds": 121}},
    ),
    Case(
        rule("[stop] force_after_seconds"),
        {"stop": {"timeout_seconds": 30, "force_after_seconds": 30}},
        {"stop": {"timeout_seconds": 30, "force_after_seconds": 31}},
    ),
    Case(
        rule("[stop] backoff_initial_seconds"),
        {"stop": {"backoff_initial_seconds": 5.5}},
        {"stop": {"backoff_initial_seconds": 5.0}},
    ),
    Case(
        rule("[leader] replica_id"),
        {"leader": {"replica_id": "sidecar-0"}, "router_db": {"url": POSTGRES_URL}},
        {
            "leader": {"replica_id": "sidecar-0", "state_dir": "/var/lib/agentic-reconciler"},
            "router_db": {"url": POSTGRES_URL},
        },
    ),
]


def keys_named(text: str, rule_: Agreement) -> bool:
    return all(key in text for key in rule_.keys)


@pytest.mark.fast
def test_every_sidecar_rule_has_a_case() -> None:
    assert [case.rule for case in SIDECAR_CASES] == list(AGREEMENTS)


@pytest.mark.fast
@pytest.mark.parametrize("case", SIDECAR_CASES, ids=[c.rule.keys[0] for c in SIDECAR_CASES])
def test_a_sidecar_rule_refuses_the_configuration_that_breaks_it_naming_both_keys(case: Case) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(case.breaks, {})
    message = str(refused.value)
    assert message.count("\n  - ") == 1, message  # this rule alone
    assert keys_named(message, case.rule), message
    assert case.rule.why in message
    assert "settings-that-must-agree" in message
    config = parse_config(case.meets, {})  # the boundary (or the fix) is accepted
    assert disagreements(config) == []


@pytest.mark.fast
def test_a_rule_broken_through_the_environment_is_refused_too() -> None:
    env = {"AGENTIC_RECONCILER_LEADER_LEASE_SECONDS": "200"}
    with pytest.raises(ConfigError, match=r"\[leader\] lease_seconds must be below \[fleet\] lost_after"):
        parse_config({}, env)


@pytest.mark.fast
def test_every_broken_rule_is_named_at_once_with_its_numbers() -> None:
    raw: Raw = {
        "leader": {"lease_seconds": 200},
        "fleet": {"check_interval_seconds": 500},
        "stop": {"force_after_seconds": 1},
    }
    with pytest.raises(ConfigError) as refused:
        parse_config(raw, {})
    lines = str(refused.value).split("\n  - ")[1:]
    assert len(lines) == 3, lines
    assert lines[0].startswith(
        "[leader] lease_seconds must be below [fleet] lost_after_seconds (here 200 and 120):"
    )
    assert "(here 500 and 120)" in lines[1] and "(here 1 and 60)" in lines[2]


@pytest.mark.fast
def test_the_defaults_and_the_example_files_agree() -> None:
    assert disagreements(reconciler_config.ReconcilerConfig()) == []
    example = tomllib.loads((ROOT / "config" / "reconciler.toml").read_text(encoding="utf-8"))
    assert disagreements(parse_config(example, {})) == []
    agent = agent_config.load_config(ROOT / "config" / "agent.toml", environ={"AGENTIC_AGENT_TOKEN": "t"})
    assert agent_config.disagreements(agent) == []


@pytest.mark.fast
def test_a_replica_id_is_one_word_that_cannot_be_mistaken_for_another_holder() -> None:
    for bad in ("a@b", "a:b", " x", "-x", "x" * 65):
        with pytest.raises(ConfigError, match=r"\[leader\] replica_id"):
            parse_config({"leader": {"replica_id": bad}}, {})
    good = "sidecar-0.prod_1"
    assert parse_config({"leader": {"replica_id": good}}, {}).leader.replica_id == good


# ------------------------------------------------------------------------------------------- the agent


def agent_toml(tmp_path: Path, lines: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nhome = "{tmp_path / "home"}"\n{lines}', encoding="utf-8")
    return path


# One per rule of agent_config.AGREEMENTS, in order: the lines that break it, the numbers the refusal
# shows ("" for a rule over a flag), and the lines that meet it at its boundary.
AGENT_CASES = [
    (
        "retain_finished_seconds = 3600.0\nretain_unread_seconds = 3599.0\n",
        "(here 3599 and 3600)",
        "retain_finished_seconds = 3600.0\nretain_unread_seconds = 3600.0\n",
    ),
    (
        "heartbeat_seconds = 10.0\nfence_after_seconds = 20.0\n",
        "(here 20 and 10)",
        "heartbeat_seconds = 10.0\nfence_after_seconds = 20.001\n",
    ),
    ("fence_after_seconds = 0\nat_most_once_default = true\n", "", "fence_after_seconds = 0\n"),
]


@pytest.mark.fast
def test_every_agent_rule_refuses_what_breaks_it_and_takes_its_boundary(tmp_path: Path) -> None:
    assert len(AGENT_CASES) == len(agent_config.AGREEMENTS)  # one case per rule
    env = {"AGENTIC_AGENT_TOKEN": "t"}
    for rule_, (breaks, here, meets) in zip(agent_config.AGREEMENTS, AGENT_CASES, strict=True):
        with pytest.raises(agent_config.ConfigError) as refused:
            agent_config.load_config(agent_toml(tmp_path, breaks), environ=env)
        assert keys_named(str(refused.value), rule_) and rule_.why in str(refused.value)
        assert here in str(refused.value) and str(refused.value).count(" - ") == 1  # that rule alone
        assert (
            agent_config.disagreements(agent_config.load_config(agent_toml(tmp_path, meets), environ=env))
            == []
        )


# ------------------------------------------------------------------------------ across the two services


def setting(raw: Mapping[str, Any], defaults: Any, name: str) -> Any:
    """A key's value in a TOML document, or the code's default."""
    table, key = table_key(name)
    return raw.get(table, {}).get(key, getattr(getattr(defaults, table, defaults), key))


def across(sidecar_file: Path, agent_file: Path) -> list[str]:
    sidecar = tomllib.loads(sidecar_file.read_text(encoding="utf-8"))
    agent = tomllib.loads(agent_file.read_text(encoding="utf-8"))
    agent_defaults = agent_config.AgentConfig(id="x", home=Path("/x"), tokens=())

    def value(name: str) -> Any:
        if name.startswith("[agent]"):
            return setting(agent, agent_defaults, name)
        return setting(sidecar, reconciler_config.ReconcilerConfig(), name)

    return broken(ACROSS_SERVICES, value)


SHIPPED_PAIRS = [
    ("config/reconciler.toml", "config/agent.toml"),
    ("deploy/compose/reconciler.toml", "deploy/compose/agent.toml"),
    ("deploy/systemd/reconciler.toml", "deploy/systemd/agent.toml"),
]


@pytest.mark.fast
@pytest.mark.parametrize(("sidecar", "agent"), SHIPPED_PAIRS)
def test_the_shipped_sidecar_and_agent_files_agree_across_the_services(sidecar: str, agent: str) -> None:
    assert across(ROOT / sidecar, ROOT / agent) == []


@pytest.mark.fast
def test_a_pair_across_the_services_names_both_keys_when_broken() -> None:
    values = {
        "[stop] timeout_seconds": 10.0,
        "[agent] grace_seconds": 10.0,
        "[fleet] lost_after_seconds": 30.0,
        "[agent] heartbeat_seconds": 10.0,
    }
    problems = broken(ACROSS_SERVICES, values.__getitem__)
    assert len(problems) == len(ACROSS_SERVICES) == 2
    for rule_, problem in zip(ACROSS_SERVICES, problems, strict=True):
        assert keys_named(problem, rule_)
    assert "3 times [agent] heartbeat_seconds (here 30 and 10)" in problems[1]
    values["[stop] timeout_seconds"], values["[fleet] lost_after_seconds"] = 10.5, 30.5
    assert broken(ACROSS_SERVICES, values.__getitem__) == []


@pytest.mark.fast
def test_the_reference_lists_every_rule_with_its_reason() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    section = text.split("## Settings that must agree", 1)[1]
    for rule_ in (*AGREEMENTS, *agent_config.AGREEMENTS, *ACROSS_SERVICES):
        shown = rule_.rule
        for key in rule_.keys:
            shown = shown.replace(key, f"`{key}`")
        assert f"| {shown} | {rule_.why} |" in section, rule_.rule


# ------------------------------------------------------------------------------------ real processes

SIDECAR_ENV = {"PATH": "/usr/bin:/bin", "AIRFLOW_PASSWORD": "pw", "AGENTIC_SIDECAR_TOKEN": "t"}


def run(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=dict(env), timeout=120, check=False
    )


def test_the_sidecar_process_exits_2_naming_both_keys(tmp_path: Path) -> None:
    config = tmp_path / "reconciler.toml"
    config.write_text(
        f'[router_db]\nurl = "sqlite:///{tmp_path / "router.db"}"\n'
        "[leader]\nlease_seconds = 30.0\n[fleet]\nlost_after_seconds = 20.0\n",
        encoding="utf-8",
    )
    for command in ("run", "check-config"):
        done = run(["-m", "reconciler", command, "--config", str(config)], SIDECAR_ENV)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "[leader] lease_seconds" in done.stderr and "[fleet] lost_after_seconds" in done.stderr
        assert "(here 30 and 20)" in done.stderr, done.stderr
    assert not (tmp_path / "router.db").exists(), "refused before touching the router DB"


def test_the_agent_process_exits_2_naming_both_keys(tmp_path: Path) -> None:
    config = agent_toml(tmp_path, "retain_finished_seconds = 600.0\nretain_unread_seconds = 60.0\n")
    env = {"PATH": "/usr/bin:/bin", "AGENTIC_AGENT_TOKEN": "t"}
    for command in ("run", "check-config"):
        done = run(["-m", "agent", command, "--config", str(config)], env)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "[agent] retain_unread_seconds" in done.stderr, done.stderr
        assert "[agent] retain_finished_seconds" in done.stderr, done.stderr
    assert not (tmp_path / "home").exists(), "refused before the agent made its home"
