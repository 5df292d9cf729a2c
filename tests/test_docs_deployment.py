"""docs/deployment.md's how-tos do what they say: the TLS how-to's shell block makes a private CA
directory, the walkthrough of Airflow 3 on hosts names real keys of the sidecar and real commands and
options of Airflow, and agents placed beside Airflow are warned off the ports its log servers take."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent.config import AgentConfig
from harness.airflow import AIRFLOW_VERSION, ensure_venv
from harness.config_reference import agent_keys, reconciler_keys

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "deployment.md"
HOSTS = "## Airflow 3 on hosts"
LOG_PORTS = {"worker_log_server_port": 8793, "trigger_log_server_port": 8794}  # Airflow's defaults
SIDECAR_NEEDS = {"base_url", "api_version", "username", "password_file"}


def section(heading: str) -> str:
    text = GUIDE.read_text(encoding="utf-8")
    assert f"\n{heading}\n" in text, f"docs/deployment.md has no section {heading!r}"
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_the_tls_howto_makes_a_ca_directory_only_its_owner_can_read(tmp_path: Path) -> None:
    """The how-to's block, run as written in a shell with the usual umask 022: the directory and every
    file it makes are the owner's alone, and the certificates it issues verify."""
    (script,) = [block for block in blocks(section("## TLS"), "sh") if "openssl req -x509" in block]
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "umask 022\n" + script],
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "vm-01.pem: OK" in done.stdout and "sidecar.pem: OK" in done.stdout
    ca = tmp_path / "agentic-ca"
    assert oct(ca.stat().st_mode & 0o777) == oct(0o700)
    made = sorted(ca.iterdir())
    assert {p.name for p in made} >= {"ca.key", "ca.pem", "vm-01.key", "vm-01.pem", "sidecar.key"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in made), [(p.name, oct(p.stat().st_mode)) for p in made]


@pytest.mark.fast
def test_agents_beside_airflow_are_warned_off_its_log_server_ports() -> None:
    text = section("## Agents on VMs (systemd)")
    default_port = AgentConfig.__dataclass_fields__["port"].default
    assert default_port not in LOG_PORTS.values()
    assert f"{default_port}" in text
    for key, port in LOG_PORTS.items():
        assert f"`[logging] {key}`" in text and f"{port}" in text, key
    assert "all interfaces" in text


@pytest.mark.fast
def test_the_host_walkthrough_gives_the_sidecar_real_keys_and_a_viewer() -> None:
    """Its TOML is the sidecar's [airflow] table with keys of config/reconciler.toml, reading as the
    user the Airflow side makes a viewer."""
    text = section(HOSTS)
    example = tomllib.loads((ROOT / "config" / "reconciler.toml").read_text(encoding="utf-8"))
    (toml,) = blocks(text, "toml")
    shown = tomllib.loads(toml)
    assert set(shown) == {"airflow"}
    assert SIDECAR_NEEDS <= set(shown["airflow"]) <= set(example["airflow"])
    assert shown["airflow"]["api_version"] == "v2"
    users = re.search(r"^simple_auth_manager_users = (\S+)$", "\n".join(blocks(text, "ini")), re.MULTILINE)
    assert users is not None
    roles = dict(pair.split(":")[:2] for pair in users.group(1).split(","))
    assert roles[shown["airflow"]["username"]] == "viewer"
    assert "`Viewer`" in text  # FAB's read-only role
    for word in ("api-server", "jwt_secret", "check-config --connect"):
        assert word in text, word


@pytest.mark.airflow
def test_the_host_walkthrough_names_real_airflow_commands_and_options(tmp_path: Path) -> None:
    """Every ``airflow ...`` command of its shell blocks parses with Airflow 3's own parser, and every
    option it names (``[section] key`` or ``AIRFLOW__SECTION__KEY``) is one of Airflow's; the log
    servers' ports are Airflow's defaults."""
    text = section(HOSTS)
    commands = [
        line.split("#")[0].split()[1:]
        for block in blocks(text, "sh")
        for line in block.splitlines()
        if line.startswith("airflow ")
    ]
    ours = {key.table for key in [*reconciler_keys(), *agent_keys()]}
    options = {(s, k) for s, k in re.findall(r"`\[([a-z_]+)\] ([a-z_]+)`", text) if s not in ours}
    for block in blocks(text, "ini"):
        current = ""
        for line in block.splitlines():
            if header := re.fullmatch(r"\[([a-z_]+)\]", line.strip()):
                current = header.group(1)
            elif key := re.match(r"([a-z_]+) =", line):
                options.add((current, key.group(1)))
    options |= {(s.lower(), k.lower()) for s, k in re.findall(r"AIRFLOW__([A-Z_]+?)__([A-Z_]+)", text)}
    options |= {("logging", key) for key in LOG_PORTS}
    assert len(commands) >= 3 and len(options) >= 6, (commands, options)
    probe = """
import json, sys
from airflow.cli.cli_parser import get_parser
from airflow.configuration import retrieve_configuration_description
commands, options = json.loads(sys.argv[1])
parser = get_parser()
bad = []
for words in commands:
    try:
        parser.parse_args(words)
    except SystemExit:
        bad.append(" ".join(words))
described = retrieve_configuration_description()
for section, key in options:
    if key not in described.get(section, {}).get("options", {}):
        bad.append(f"[{section}] {key}")
logging = described["logging"]["options"]
ports = {k: logging[k]["default"] for k in ("worker_log_server_port", "trigger_log_server_port")}
print(json.dumps({"bad": bad, "ports": ports}))
"""
    python = ensure_venv(AIRFLOW_VERSION) / "bin" / "python"
    done = subprocess.run(
        [str(python), "-c", probe, json.dumps([commands, sorted(options)])],
        env={"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["bad"] == [], answer["bad"]
    assert {k: int(v) for k, v in answer["ports"].items()} == LOG_PORTS
