"""Airflow's provider entry point: ``airflow providers list`` shows this package with its version.

Registered in ``pyproject.toml`` (``[project.entry-points.apache_airflow_provider]``). Airflow calls
:func:`get_provider_info` while it discovers providers and validates the answer against its
``provider_info.schema.json``, so nothing here imports Airflow.

No ``connection-types``: that needs a hook class, and the operator needs none. Its connection,
``agentic_run_default``, is a plain HTTP connection whose password is the sidecar's token:
``AIRFLOW_CONN_AGENTIC_RUN_DEFAULT='http://:<token>@sidecar-host:8790'``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGE = "agentic-airflow"
INTEGRATION = "Agentic Run"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": PACKAGE,
        "name": INTEGRATION,
        "description": (
            "Run commands on remote VMs through agents, deferred while they run, and stop them when "
            "their task is marked failed or success, cleared, or its DAG run deleted (the reconciler "
            "sidecar)."
        ),
        "versions": [_version()],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["software"]}],
        "operators": [{"integration-name": INTEGRATION, "python-modules": ["agentic_airflow.operators"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["agentic_airflow.triggers"]}],
    }


def _version() -> str:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # imported from a source tree that is not installed
        return "0+unknown"
