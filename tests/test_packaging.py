"""What installing this project pulls in: nothing into Airflow, only aiohttp onto a VM.

``pip install --dry-run --report`` resolves exactly as an install would (dependencies included) and says
what it would install, without changing the environment. Into the harness's real Airflow 3.3.2 and
2.11.2 venvs the plain install adds this package and nothing else (Airflow 2 needs SQLAlchemy 1.4: the
sidecar's SQLAlchemy 2 must never come along); the agent's extra adds only aiohttp and its own
dependencies; a service started without its extra names the extra to install.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.airflow import AIRFLOW_2_VERSION, AIRFLOW_VERSION, ensure_venv, install_project
from servicekit.extras import require

ROOT = Path(__file__).resolve().parent.parent
SIDECAR_ONLY = {"sqlalchemy", "alembic", "psycopg", "psycopg-binary", "tenacity", "prometheus-client"}


def would_install(pip: Path, requirement: str, *extra: str) -> dict[str, str]:
    """name -> version of every distribution ``pip install requirement`` would install."""
    done = subprocess.run(
        [str(pip), "install", "--dry-run", "--quiet", "--report", "-", *extra, requirement],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    return {_normal(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.airflow
@pytest.mark.parametrize("version", [AIRFLOW_VERSION, AIRFLOW_2_VERSION], ids=lambda v: f"airflow-{v}")
def test_a_plain_install_into_airflow_adds_only_this_package(version: str) -> None:
    pip = ensure_venv(version) / "bin" / "pip"
    # --force-reinstall: resolve from scratch, as for a first install (the harness installed it before).
    installed = would_install(pip, str(ROOT), "--force-reinstall", "--no-deps")
    assert set(installed) == {"agentic-airflow"}
    resolved = would_install(pip, str(ROOT))  # with dependencies: what a deployment tool does
    assert set(resolved) <= {"agentic-airflow"}, f"would change Airflow {version}'s environment: {resolved}"
    install_project(pip.parent.parent)  # what the harness runs Airflow with: this checkout
    check = subprocess.run([str(pip), "check"], capture_output=True, text=True, check=False, timeout=120)
    assert "agentic-airflow" not in check.stdout.lower(), check.stdout


def test_the_agent_extra_on_a_fresh_vm_brings_aiohttp_and_nothing_of_the_sidecar(tmp_path: Path) -> None:
    venv = tmp_path / "vm"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = would_install(venv / "bin" / "pip", f"{ROOT}[agent]")
    assert "aiohttp" in installed and "agentic-airflow" in installed
    assert not (set(installed) & (SIDECAR_ONLY | {"httpx"})), installed


@pytest.mark.fast
def test_a_service_without_its_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "aiohttp" else real(name))
    with pytest.raises(SystemExit) as exited:
        require("agent", "aiohttp", "json", command="agentic-agent")
    assert str(exited.value) == (
        "agentic-agent: needs the [agent] extra, missing aiohttp: pip install 'agentic-airflow[agent]'"
    )
    require("agent", "json", command="agentic-agent")  # all there: returns
