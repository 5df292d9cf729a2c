"""The Airflow integration: the provider entry point, checked by Airflow itself, and the connection.

Uses the cached Airflow 3 venv of the harness (created on first use, like the end-to-end tests) but
starts no Airflow: this package is installed into a temporary directory put first on Airflow's path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from agentic_airflow.provider import get_provider_info
from agentic_airflow.sidecar_client import SidecarEndpoint
from harness.airflow import ensure_venv

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_URI = "http://:<token>@sidecar-host:8790"  # README, docs/deployment.md

DISCOVER = """
import json
from airflow.models.connection import Connection
from airflow.providers_manager import ProvidersManager

info = ProvidersManager().providers["agentic-airflow"]  # Airflow validates it against its schema
conn = Connection(conn_id="agentic_run_default", uri=URI)
print(json.dumps({
    "version": info.version,
    "provider": info.data,
    "connection": {"conn_type": conn.conn_type, "host": conn.host, "port": conn.port,
                   "password": conn.password, "extra": conn.extra_dejson},
}))
"""


def airflow_python() -> Path:
    return ensure_venv() / "bin" / "python"


def airflow_schema() -> dict[str, object]:
    (schema,) = (ensure_venv() / "lib").glob("python3.*/site-packages/airflow/provider_info.schema.json")
    return json.loads(schema.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_pyproject_registers_the_provider_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    entry = project["entry-points"]["apache_airflow_provider"]["provider_info"]
    assert entry == "agentic_airflow.provider:get_provider_info"
    assert get_provider_info()["package-name"] == project["name"]


@pytest.mark.airflow
def test_provider_info_matches_airflows_schema() -> None:
    info = get_provider_info()
    jsonschema.Draft7Validator(airflow_schema()).validate(info)
    assert info["versions"][0] != "0+unknown", "the package is installed in the test venv"
    for section in ("operators", "triggers"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


@pytest.mark.airflow
def test_airflow_lists_the_package_and_parses_the_documented_connection(tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(ROOT)],
        check=True,
        capture_output=True,
    )
    uri = DOCUMENTED_URI.replace("<token>", "s3cr3t")
    result = subprocess.run(
        [str(airflow_python()), "-c", f"URI = {uri!r}\n{DISCOVER}"],
        env={"PYTHONPATH": str(site), "AIRFLOW_HOME": str(tmp_path / "airflow"), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["version"] == get_provider_info()["versions"][0]
    assert found["provider"]["name"] == get_provider_info()["name"]
    endpoint = SidecarEndpoint.from_connection(**found["connection"])
    assert endpoint.base_url == "http://sidecar-host:8790" and endpoint.token == "s3cr3t"
