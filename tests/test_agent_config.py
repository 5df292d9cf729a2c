"""Agent configuration: TOML, environment overrides, the token, and how bad config is reported."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, load_config
from harness.agent import REPO_ROOT
from tests.certs import make_ca

EXAMPLE = REPO_ROOT / "config" / "agent.toml"
TOKEN = "config-test-token-9999"
ENV = "AGENTIC_AGENT_TOKEN"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return path


@pytest.mark.fast
def test_the_example_config_loads_and_states_the_defaults() -> None:
    config = load_config(EXAMPLE, environ={"AGENTIC_AGENT_TOKEN": TOKEN})
    assert config == AgentConfig(
        id=socket.gethostname(), home=Path("/var/lib/agentic-agent"), tokens=(TOKEN,)
    )


@pytest.mark.fast
def test_every_key_is_documented_in_the_example() -> None:
    text = EXAMPLE.read_text()
    for field in dataclasses.fields(AgentConfig):
        if field.repr:  # secrets (tokens, fleet_tokens) are never in the file
            assert f"{field.name} =" in text, field.name


@pytest.mark.fast
def test_file_values_and_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\nid = "vm-7"\nport = 9000\ngrace_seconds = 3\nhome = "/srv/agent"\n')
    env = {"AGENTIC_AGENT_TOKEN": TOKEN, "AGENTIC_AGENT_PORT": "9100", "AGENTIC_AGENT_GRACE_SECONDS": "2.5"}
    config = load_config(path, environ=env)
    assert (config.id, config.port, config.grace_seconds, config.home) == (
        "vm-7",
        9100,
        2.5,
        Path("/srv/agent"),
    )


@pytest.mark.fast
def test_token_comes_from_the_named_env_var_or_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\ntoken_env = "MY_AGENT_SECRET"\n')
    assert load_config(path, environ={"MY_AGENT_SECRET": TOKEN}).tokens == (TOKEN,)
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    path = write(tmp_path, f'[agent]\ntoken_file = "{token_file}"\n')
    assert load_config(path, environ={}).tokens == (TOKEN,)
    assert TOKEN not in repr(load_config(path, environ={}))


@pytest.mark.fast
def test_several_tokens_are_accepted_for_rotation(tmp_path: Path) -> None:
    env_value = " old-token, new-token\tspare-token\nold-token "
    config = load_config(write(tmp_path, "[agent]\n"), environ={"AGENTIC_AGENT_TOKEN": env_value})
    assert config.tokens == ("old-token", "new-token", "spare-token")
    token_file = tmp_path / "tokens"
    token_file.write_text("old-token\nnew-token\n\n")
    config = load_config(write(tmp_path, f'[agent]\ntoken_file = "{token_file}"\n'), environ={})
    assert config.tokens == ("old-token", "new-token")
    assert "old-token" not in repr(config) and "new-token" not in repr(config)
    with pytest.raises(ConfigError, match="empty"):
        token_file.write_text(" ,\n")
        load_config(write(tmp_path, f'[agent]\ntoken_file = "{token_file}"\n'), environ={})


@pytest.mark.parametrize(
    ("body", "env", "names"),
    [
        ("[agent]\nprot = 1\n", {}, "prot"),
        ("[agent]\nport = 'http'\n", {}, "port"),
        ("[agent]\nport = true\n", {}, "port"),
        ("[agent]\nport = 70000\n", {}, "port"),
        ("[agent]\ngrace_seconds = -1\n", {}, "grace_seconds"),
        ("[agent]\npoll_seconds = 0\n", {}, "poll_seconds"),
        ("[agent]\nmax_body_bytes = 1.5\n", {}, "max_body_bytes"),
        ("[agent]\nid = ''\n", {}, "id"),
        ("[agent]\n", {"AGENTIC_AGENT_PORT": "eighty"}, "AGENTIC_AGENT_PORT"),
        (f"[agent]\ntoken = '{TOKEN}'\n", {}, "token"),
        ("[agnet]\nport = 1\n", {}, "agnet"),
        ("[agent\n", {}, "TOML"),
    ],
)
@pytest.mark.fast
def test_bad_values_name_the_key_and_never_the_token(
    tmp_path: Path, body: str, env: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, body), environ={"AGENTIC_AGENT_TOKEN": TOKEN, **env})
    assert names in str(caught.value)
    assert TOKEN not in str(caught.value)


@pytest.mark.fast
def test_a_missing_token_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AGENTIC_AGENT_TOKEN"):
        load_config(write(tmp_path, "[agent]\n"), environ={})
    with pytest.raises(ConfigError, match="token_file"):
        load_config(write(tmp_path, f'[agent]\ntoken_file = "{tmp_path / "absent"}"\n'), environ={})


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[agent]\nport = 'http'\n")
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"AGENTIC_AGENT_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "port" in done.stderr
    assert "Traceback" not in done.stderr and TOKEN not in done.stderr


# ----------------------------------------------------------------------------------------------- TLS


def tls_config(tmp_path: Path, cert: Path | None, key: Path | None) -> Path:
    lines = ["[agent]"]
    lines += [f'tls_cert_file = "{cert}"'] if cert is not None else []
    lines += [f'tls_key_file = "{key}"'] if key is not None else []
    return write(tmp_path, "\n".join(lines) + "\n")


@pytest.mark.fast
def test_tls_files_are_loaded_with_the_config(tmp_path: Path) -> None:
    server = make_ca(tmp_path / "ca", "CA").issue(tmp_path / "server", hosts=["127.0.0.1"])
    config = load_config(tls_config(tmp_path, server.cert_file, server.key_file), environ={ENV: TOKEN})
    assert (config.tls_cert_file, config.tls_key_file, config.scheme) == (
        server.cert_file,
        server.key_file,
        "https",
    )
    assert config.server_ssl_context() is not None
    plain = load_config(write(tmp_path, "[agent]\n"), environ={ENV: TOKEN})
    assert (plain.scheme, plain.server_ssl_context()) == ("http", None)


@pytest.mark.fast
def test_bad_tls_files_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "CA")
    server = ca.issue(tmp_path / "server", hosts=["127.0.0.1"])
    other = ca.issue(tmp_path / "other", hosts=["127.0.0.1"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    unreadable = tmp_path / "unreadable.pem"
    unreadable.mkdir()  # reading a directory fails even as root, which ignores file modes
    cases = [
        (server.cert_file, None, "set both"),
        (None, server.key_file, "set both"),
        (tmp_path / "absent.pem", server.key_file, "tls_cert_file: cannot read"),
        (server.cert_file, unreadable, "tls_key_file: cannot read"),
        (server.cert_file, other.key_file, "matching"),  # a key that does not belong to the cert
        (garbage, server.key_file, "PEM"),
    ]
    for cert, key, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            load_config(tls_config(tmp_path, cert, key), environ={ENV: TOKEN})
        assert "tls_" in str(caught.value) and TOKEN not in str(caught.value)


def test_a_missing_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(tmp_path / "absent.toml")],
        capture_output=True,
        text=True,
        env={ENV: TOKEN, "PATH": "/usr/bin:/bin"},
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "absent.toml" in done.stderr
