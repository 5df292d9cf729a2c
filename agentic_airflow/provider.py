"""Airflow's provider entry point: ``airflow providers list`` shows this package with its version.

Registered in ``pyproject.toml`` (``[project.entry-points.apache_airflow_provider]``). Airflow calls
:func:`get_provider_info` while it discovers providers and validates the answer against its
``provider_info.schema.json``, so nothing here imports Airflow.

What it declares: the operator and its trigger; the connection type ``agentic_run``
(:class:`agentic_airflow.hooks.AgenticRunHook`) with its form; the extra link "Agentic job". The form
is declared once, below: Airflow 3.2+ reads it from here (``conn-fields``, ``ui-field-behaviour``),
Airflow 2 and 3.0-3.1 ask the hook, which builds its widgets from the same declaration. Connections of
type ``http``/``https`` keep working (``http://:<token>@sidecar-host:8790``); see docs/provider.md.
"""

from __future__ import annotations

from copy import deepcopy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGE = "agentic-airflow"
INTEGRATION = "Agentic Run"
CONN_TYPE = "agentic_run"
HOOK_NAME = "Agentic Run (sidecar)"
HOOK_CLASS = "agentic_airflow.hooks.AgenticRunHook"
LINK_CLASS = "agentic_airflow.links.AgenticJobLink"

# The form's fields kept in the connection's extra, in provider info's ``conn-fields`` shape.
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "base_path": {
        "label": "Base path",
        "description": "Path prefix the sidecar is served under, e.g. /agentic behind a proxy.",
        "schema": {"type": ["string", "null"]},
    },
    "ca_file": {
        "label": "CA file",
        "description": "CA bundle that verifies an https sidecar (default: the system's trust store).",
        "schema": {"type": ["string", "null"]},
    },
    "scheme": {
        "label": "Scheme",
        "description": "http or https; a scheme written in the host wins.",
        "schema": {"type": ["string", "null"], "enum": ["http", "https"], "default": "http"},
    },
}

# The standard fields: no schema or login; the password is the sidecar's token.
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["schema", "login"],
    "relabeling": {"password": "Token"},
    "placeholders": {
        "host": "sidecar-host (or https://sidecar-host)",
        "port": "8790",
        "password": "the sidecar's token",
        "base_path": "/agentic",
        "ca_file": "/etc/ssl/agentic/ca.pem",
        "scheme": "http",
    },
}


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
        "hooks": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["agentic_airflow.hooks", "agentic_airflow.callbacks"],
            }
        ],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": HOOK_CLASS,
                "hook-name": HOOK_NAME,
                # Copies: Airflow rewrites what it is given (it prefixes the placeholders' names).
                "conn-fields": deepcopy(CONN_FIELDS),
                "ui-field-behaviour": {
                    "hidden-fields": list(UI_FIELD_BEHAVIOUR["hidden_fields"]),
                    "relabeling": dict(UI_FIELD_BEHAVIOUR["relabeling"]),
                    "placeholders": dict(UI_FIELD_BEHAVIOUR["placeholders"]),
                },
            }
        ],
        "extra-links": [LINK_CLASS],
    }


def _version() -> str:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # imported from a source tree that is not installed
        return "0+unknown"
