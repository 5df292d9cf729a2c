"""The Airflow integration: the provider entry point, checked by Airflow itself, and the connection.

Uses the cached Airflow 3.3.2 and 2.11.2 venvs of the harness (created on first use, like the
end-to-end tests) but starts no Airflow: this package is installed into a temporary directory put
first on Airflow's path. tests/test_provider_airflow.py checks what Airflow makes of the declarations.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agentic_airflow.provider import get_provider_info
from agentic_airflow.sidecar_client import SidecarEndpoint
from harness.airflow import AIRFLOW_2_VERSION, AIRFLOW_VERSION, ensure_venv

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


def airflow_schema(version: str = AIRFLOW_VERSION, name: str = "provider_info.schema.json") -> dict[str, Any]:
    (schema,) = (ensure_venv(version) / "lib").glob(f"python3.*/site-packages/airflow/{name}")
    return json.loads(schema.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def defined(dotted: str) -> bool:
    """``module.Class`` names a class defined in this checkout (read, not imported: no Airflow here)."""
    module, _, name = dotted.rpartition(".")
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8")) if path.is_file() else ast.Module(body=[])
    return any(isinstance(node, ast.ClassDef) and node.name == name for node in tree.body)


def test_pyproject_registers_the_provider_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    entry = project["entry-points"]["apache_airflow_provider"]["provider_info"]
    assert entry == "agentic_airflow.provider:get_provider_info"
    assert get_provider_info()["package-name"] == project["name"]


@pytest.mark.airflow
def test_provider_info_matches_the_schemas_of_airflow_3_and_2() -> None:
    info = get_provider_info()
    for version in (AIRFLOW_VERSION, AIRFLOW_2_VERSION):
        jsonschema.Draft7Validator(airflow_schema(version)).validate(info)
    assert info["versions"][0] != "0+unknown", "the package is installed in the test venv"
    for section in ("operators", "triggers", "hooks"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    classes = [c["hook-class-name"] for c in info["connection-types"]] + info["extra-links"]
    assert classes and all(defined(c) for c in classes), classes


@pytest.mark.airflow
def test_the_connection_form_matches_airflows_own_definition_of_its_keys() -> None:
    """provider_info.schema.json lets any key into a connection type; provider.yaml.schema.json, the
    schema of Airflow's own providers, defines ``conn-fields`` and ``ui-field-behaviour`` key by key."""
    schema = airflow_schema(AIRFLOW_VERSION, "provider.yaml.schema.json")["properties"]["connection-types"]
    connection_types = get_provider_info()["connection-types"]
    jsonschema.Draft7Validator(schema).validate(connection_types)
    (agentic_run,) = connection_types
    assert set(agentic_run) >= {"conn-fields", "ui-field-behaviour", "hook-name"}
    shown = set(agentic_run["conn-fields"]) | {"host", "port", "password", "extra", "description"}
    assert set(agentic_run["ui-field-behaviour"]["placeholders"]) <= shown


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
