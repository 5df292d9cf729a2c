"""``python -m agent check-config``: what the agent needs before it listens, checked and named; and
the default home an ordinary user can write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as agent_config

ROOT = Path(__file__).resolve().parent.parent


def check(tmp_path: Path, body: str, token: str = "t0ken") -> subprocess.CompletedProcess[str]:
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\n" + body)
    env = {"PATH": "/usr/bin:/bin", "AGENTIC_AGENT_TOKEN": token, "HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_good_configuration_passes_and_names_what_it_checked(tmp_path: Path) -> None:
    done = check(tmp_path, f'id = "vm-01"\nport = 8791\nhome = "{tmp_path / "home"}"\n')
    assert done.returncode == 0, done.stderr
    assert f"ok (agent vm-01, http://127.0.0.1:8791, home {tmp_path / 'home'}, 1 token)" in done.stdout
    assert "t0ken" not in done.stdout + done.stderr
    assert (tmp_path / "home" / "jobs").is_dir()


def test_each_problem_is_named_with_its_exit_code(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = check(tmp_path, f'home = "{blocker / "home"}"\n')
    assert unwritable.returncode == 1 and f"home {blocker / 'home'} is not writable" in unwritable.stderr
    tls = 'tls_cert_file = "/nope.pem"\ntls_key_file = "/nope.key"\n'
    no_tls = check(tmp_path, f'home = "{tmp_path}"\n{tls}')
    assert no_tls.returncode == 2 and "/nope.pem" in no_tls.stderr
    no_token = check(tmp_path, f'home = "{tmp_path}"\n', token="")
    assert no_token.returncode == 2 and "AGENTIC_AGENT_TOKEN" in no_token.stderr


@pytest.mark.fast
def test_the_default_home_needs_root_only_when_run_as_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(agent_config.os, "geteuid", lambda: 0)
    assert agent_config.default_home() == Path("/var/lib/agentic-agent")
    monkeypatch.setattr(agent_config.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert agent_config.default_home() == tmp_path / ".local" / "state" / "agentic-agent"
