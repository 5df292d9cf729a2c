"""Locked environments: what the project's venv and each Airflow venv are installed from.

A fresh machine must resolve exactly what CI tested, whatever was released since (harness/locks.py).
cryptography 51, released after Airflow 3.1 and 2.11, broke their fernet: with a fernet key set, every
connection failed to parse, and a task's connection looked "not defined". The locks pin what each
Airflow needs, and every harness Airflow runs with a fernet key, as production does.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from harness.airflow import (
    AIRFLOW_2_VERSION,
    AIRFLOW_3_1_VERSION,
    AIRFLOW_VERSION,
    FERNET_KEY,
    SUPPORTED_VERSIONS,
    AirflowServer,
    ensure_venv,
    selected_versions,
)
from harness.locks import (
    AIRFLOW_PINS,
    DEV_LOCK,
    LockError,
    airflow_lock,
    airflow_requirements,
    check_installed,
    pins,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.fast
def test_this_venv_is_exactly_the_dev_lock() -> None:
    assert check_installed(DEV_LOCK) == []


@pytest.mark.fast
@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_each_airflow_lock_holds_its_version_and_satisfies_its_pins(version: str) -> None:
    lock = airflow_requirements(version)
    locked = pins(lock)
    assert locked["apache-airflow"] == version
    assert locked["pip"], "the lock names the pip that installs it"
    for pin in AIRFLOW_PINS[version]:
        requirement = Requirement(pin)
        name = requirement.name.lower()
        assert name in locked, f"{lock.name}: {name} is pinned but not locked"
        version_locked = locked[name]
        assert requirement.specifier.contains(version_locked), f"{lock.name}: {name}=={version_locked}, {pin}"
    header = lock.read_text().splitlines()[0]
    assert "refreshed 20" in header and "by scripts/lock" in header, header


@pytest.mark.fast
def test_every_airflow_that_sets_is_encrypted_on_multifernet_is_held_below_cryptography_51() -> None:
    # 3.2 and later wrap MultiFernet instead of setting an attribute on it.
    for version in SUPPORTED_VERSIONS:
        if tuple(int(part) for part in version.split(".")[:2]) < (3, 2):
            assert any(pin.startswith("cryptography<51") for pin in AIRFLOW_PINS[version]), version


@pytest.mark.fast
def test_an_unsupported_version_names_the_way_to_add_it() -> None:
    with pytest.raises(LockError, match=r"no lock for Airflow 2\.9\.3 .*scripts/lock --airflow 2\.9\.3"):
        airflow_requirements("2.9.3")
    assert not airflow_lock("2.9.3").exists()


@pytest.mark.fast
def test_every_harness_airflow_runs_with_a_fernet_key(tmp_path: Path) -> None:
    server = AirflowServer(home=tmp_path / "home", dags_folder=tmp_path / "dags", venv=tmp_path / "venv")
    server.database = "unused"  # env() only: nothing starts
    assert server.env()["AIRFLOW__CORE__FERNET_KEY"] == FERNET_KEY


@pytest.mark.fast
def test_selected_versions_takes_all_or_supported_ones_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTIC_AIRFLOW_VERSIONS", "all")
    assert selected_versions([AIRFLOW_VERSION]) == list(SUPPORTED_VERSIONS)
    monkeypatch.setenv("AGENTIC_AIRFLOW_VERSIONS", "3.0.6, 2.10.5")
    assert selected_versions([AIRFLOW_VERSION]) == ["3.0.6", "2.10.5"]
    monkeypatch.setenv("AGENTIC_AIRFLOW_VERSIONS", "2.9.3")
    with pytest.raises(ValueError, match="not a supported Airflow"):
        selected_versions([AIRFLOW_VERSION])


# Inside the Airflow venv: a connection encrypted with the fernet key, as `airflow connections add`
# stores it, read back as a task reads it. cryptography 51 failed this on 3.1 and 2.11.
ENCRYPTED_CONNECTION = """
from airflow.models.connection import Connection
conn = Connection(conn_id="agentic_run_default", uri="http://:s3cret@127.0.0.1:8790")
stored = conn._password
assert stored and stored != "s3cret", "not encrypted"
loaded = Connection(conn_id="agentic_run_default", conn_type="http", host="127.0.0.1", port=8790)
loaded._password, loaded.is_encrypted = stored, True
assert loaded.password == "s3cret", loaded.password
print("ok")
"""


@pytest.mark.airflow
@pytest.mark.parametrize(
    "version",
    selected_versions([AIRFLOW_VERSION, AIRFLOW_3_1_VERSION, AIRFLOW_2_VERSION]),
    ids=lambda v: f"airflow-{v}",
)
def test_a_locked_airflow_reads_a_connection_stored_with_a_fernet_key(version: str, tmp_path: Path) -> None:
    venv = ensure_venv(version)
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    env |= {
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__FERNET_KEY": FERNET_KEY,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/airflow.db",
    }
    done = subprocess.run(
        [str(venv / "bin/python"), "-c", ENCRYPTED_CONNECTION],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.fast
def test_the_copy_installed_into_airflow_holds_every_package_of_the_wheel() -> None:
    import tomllib

    from harness.airflow import PROJECT_PACKAGES

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {pattern.rstrip("*") for pattern in found["include"]} == set(PROJECT_PACKAGES)
