"""What installing this project pulls in: nothing into Airflow, only aiohttp onto a VM.

Into the harness's real Airflow 3.3.2 and 2.11.2 venvs (others by ``AGENTIC_AIRFLOW_VERSIONS``, e.g.
``2.10.5`` or ``all``), a plain ``pip install <checkout>`` (dependencies included, as a deployment tool runs
it) installs this package and nothing else (Airflow 2 needs SQLAlchemy 1.4: the sidecar's SQLAlchemy 2
must never come along), and Airflow still migrates its database and lists this package as a provider.
``pip install --dry-run --report`` resolves exactly as an install would and says what it would
install, without changing the environment: the agent's extra adds only aiohttp and its own
dependencies. A service started without its extra names the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.airflow import AIRFLOW_2_VERSION, AIRFLOW_VERSION, ensure_venv, selected_versions, venv_lock
from servicekit.extras import require

ROOT = Path(__file__).resolve().parent.parent
SIDECAR_ONLY = {"sqlalchemy", "alembic", "psycopg", "psycopg-binary", "tenacity", "prometheus-client"}


def would_install(pip: Path, requirement: str, *extra: str) -> dict[str, str]:
    """name -> version of every distribution ``pip install requirement`` would install."""
    return installs(pip, requirement, "--dry-run", *extra)


def installs(pip: Path, requirement: str, *extra: str) -> dict[str, str]:
    """``pip install requirement`` (dependencies included); name -> version of what it installed."""
    done = subprocess.run(
        [str(pip), "install", "--quiet", "--report", "-", *extra, requirement],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    return {_normal(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def succeeds(argv: list[Path | str], env: dict[str, str] | None = None) -> str:
    """Run ``argv``; its stdout, once it exited 0."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.airflow
@pytest.mark.parametrize(
    "version", selected_versions([AIRFLOW_VERSION, AIRFLOW_2_VERSION]), ids=lambda v: f"airflow-{v}"
)
def test_a_plain_install_into_airflow_adds_only_this_package(version: str, tmp_path: Path) -> None:
    with airflow_copy(ensure_venv(version), tmp_path) as (pip, airflow):
        plain_install(version, pip, airflow, tmp_path)


@contextmanager
def airflow_copy(venv: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A copy of the cached Airflow venv (hard links, beside it: a second or two), and commands running
    its pip and its airflow. Uninstalling the project from the cached venv itself would pull it from
    under every Airflow another test runs from that venv at the moment."""
    copy = venv.parent / f".{venv.name}-copy-{uuid.uuid4().hex[:8]}"
    try:
        with venv_lock(venv):  # a whole venv, not one being installed into
            subprocess.run(["cp", "-al", str(venv), str(copy)], check=True, timeout=300)
        commands = []
        for name, module in (("pip", "pip"), ("airflow", "airflow")):
            command = tmp_path / name
            command.write_text(f'#!/bin/sh\nexec "{copy}/bin/python" -m {module} "$@"\n')
            command.chmod(0o755)
            commands.append(command)
        yield commands[0], commands[1]
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def plain_install(version: str, pip: Path, airflow: Path, tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # A throwaway Airflow on SQLite, whatever AIRFLOW_* the caller's environment holds.
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    env |= {"AIRFLOW_HOME": str(tmp_path / "airflow-home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    succeeds([pip, "uninstall", "--quiet", "--yes", "agentic-airflow"])  # a first install, from here
    if project["dependencies"]:
        # What a real install pulled in would change Airflow's environment (SQLAlchemy 2 breaks
        # Airflow 2): resolve first. With no dependency declared, pip can add nothing else.
        resolved = would_install(pip, str(ROOT))
        assert set(resolved) == {"agentic-airflow"}, f"would change Airflow {version}: {resolved}"
    installed = installs(pip, str(ROOT))
    assert installed == {"agentic-airflow": project["version"]}, f"changed Airflow {version}: {installed}"
    # Only this package's requirements: Airflow's own, installed without constraints, are not ours.
    check = subprocess.run([str(pip), "check"], capture_output=True, text=True, check=False, timeout=120)
    assert "agentic-airflow" not in check.stdout.lower(), check.stdout
    succeeds([airflow, "db", "migrate"], env)
    listed_out = succeeds([airflow, "providers", "list", "--output", "json"], env)
    # Airflow 3.0 logs its plugin set-up to stdout before the JSON: the JSON is the last line.
    providers = json.loads(listed_out.strip().splitlines()[-1])
    listed = {provider["package_name"]: provider["version"] for provider in providers}
    assert listed.get("agentic-airflow") == project["version"], listed


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
