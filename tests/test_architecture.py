"""The layers of ``docs/architecture.md`` hold: each package imports only what its layer may.

Read from the source (every ``import`` and ``from ... import``, including those under
``TYPE_CHECKING``), so a forbidden import fails here before it ships.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {
    "servicekit",
    "agent_api",
    "sidecar_api",
    "agent",
    "router_db",
    "reconciler",
    "agentic_airflow",
    "agentic_cli",
    "harness",
    "bench",
    "tests",
    "simulation",
}

# package -> the first-party packages it may import (besides itself)
MAY_IMPORT: dict[str, set[str]] = {
    "servicekit": set(),  # domain-free: nothing of ours
    "agent_api": set(),  # the agent's wire shapes and client
    "sidecar_api": {"agent_api"},  # the router API's wire shapes (job ids are the agent's)
    "agent": {"servicekit", "agent_api"},  # runs on every VM: never the sidecar's parts
    "router_db": {"sidecar_api"},  # stores the router API's status words
    "reconciler": {"servicekit", "agent_api", "sidecar_api", "router_db"},  # the sidecar
    "agentic_airflow": {"sidecar_api"},  # runs inside Airflow
    "agentic_cli": set(),  # on people's machines: the sidecar's HTTP API only
    # The core's simulation: the sidecar's real parts, and the agent's own words for an unknown job.
    # Nothing shipped imports it.
    "simulation": {"servicekit", "agent_api", "sidecar_api", "router_db", "reconciler", "agent"},
}

# What code running inside Airflow may import beyond the standard library: what Airflow ships.
AIRFLOW_SIDE_THIRD_PARTY = {"airflow", "httpx", "asgiref"}
# The connection form's widget classes, in agentic_airflow/hooks.py only: imported inside
# get_connection_form_widgets, which only the form of Airflow 2 (it ships them) and 3.0-3.1 (it stands in
# for them) calls.
FORM_WIDGETS = {"flask_appbuilder", "flask_babel", "wtforms"}
# The wire modules the provider imports run inside Airflow too: standard library only.
STDLIB_ONLY = ["sidecar_api/protocol.py", "agent_api/protocol.py"]


def imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (relative imports excluded: same package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources(package)
        for name in imports(path) & FIRST_PARTY
        if name not in allowed
    }
    assert not wrong, sorted(wrong)


def test_every_package_has_a_rule() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"harness", "bench", "tests"}
    assert packages == set(MAY_IMPORT)


def test_the_airflow_side_brings_nothing_airflow_lacks() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in sources("agentic_airflow"):
        form = FORM_WIDGETS if path.name == "hooks.py" else set()
        foreign = imports(path) - stdlib - FIRST_PARTY - AIRFLOW_SIDE_THIRD_PARTY - form
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}"
    for name in STDLIB_ONLY:
        foreign = imports(ROOT / name) - stdlib - FIRST_PARTY
        assert not foreign, f"{name} imports {sorted(foreign)}"


def test_the_rules_catch_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "x.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from reconciler.loop import X\n"
    )
    assert "reconciler" in imports(module)
