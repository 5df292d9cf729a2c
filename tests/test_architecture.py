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
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from reconciler.core.loop import X\n"
    )
    assert "reconciler" in imports(module)


# --- inside the sidecar -------------------------------------------------------------------------------

# The sidecar's parts (docs/architecture.md), each with the parts it may import besides itself. "shared"
# is the top-level modules every part uses; the wiring (service, __main__) may import anything.
SHARED = {"reconciler.config", "reconciler.metrics", "reconciler.logfields", "reconciler.errors"}
WIRING = {"reconciler", "reconciler.service", "reconciler.__main__"}
# The fleet's rules import nothing of the sidecar: the configuration parses with them.
FLEET_RULES = {
    "reconciler.fleet.routing",
    "reconciler.fleet.scope",
    "reconciler.fleet.versions",
    "reconciler.fleet.fencing",
}
PART_MAY_IMPORT: dict[str, set[str]] = {
    "shared": {"fleet rules"},
    "fleet rules": set(),
    "airflow": {"shared"},  # Airflow's client: I/O, no decisions
    "fleet": {"shared", "fleet rules"},  # the agents: knows no Airflow, no job decisions
    "core": {"shared", "fleet rules", "airflow", "fleet"},  # the cycle and the job service
    "api": {"shared", "fleet rules", "airflow", "fleet", "core"},  # HTTP: parses, calls, answers
}
# Modules still over the size a module should keep (about 400 lines), each at most as long as it is
# now: they may shrink, never grow. Splitting them is open work.
LONG_MODULES = {
    "reconciler/fleet/liveness.py": 654,
    "reconciler/fleet/registry.py": 604,
    "reconciler/core/targeted.py": 512,
    "reconciler/api/pages.py": 657,
    "reconciler/config.py": 498,
    "reconciler/api/server.py": 441,
}
MODULE_LINES = 400


def sidecar_modules() -> dict[str, Path]:
    found = {}
    for path in sources("reconciler"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def sidecar_imports(path: Path) -> set[str]:
    """The sidecar's modules ``path`` imports, by dotted name (``TYPE_CHECKING`` ones included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("reconciler"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("reconciler"))
    return found


def part_of(module: str) -> str | None:
    if module in WIRING:
        return None
    if module in SHARED:
        return "shared"
    if module in FLEET_RULES:
        return "fleet rules"
    return module.split(".")[1]


def test_each_part_of_the_sidecar_imports_only_the_parts_below_it() -> None:
    modules = sidecar_modules()
    wrong = []
    for module, path in modules.items():
        part = part_of(module)
        if part is None:
            continue
        assert part in PART_MAY_IMPORT, f"{module} is in no part: add it to docs/architecture.md and here"
        for name in sidecar_imports(path):
            other = part_of(name)
            if (other is None and name != "reconciler") or other not in PART_MAY_IMPORT[part] | {part, None}:
                wrong.append(f"{module} ({part}) imports {name} ({other})")
    assert not wrong, wrong


def test_the_sidecar_has_no_import_circle() -> None:
    graph = {module: sidecar_imports(path) for module, path in sidecar_modules().items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for name in sorted(graph.get(module, ())):
            if state.get(name) == 1:
                return [*path, module, name]
            if name in graph and not state.get(name) and (circle := visit(name, [*path, module])):
                return circle
        state[module] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            assert (circle := visit(module, [])) is None, " -> ".join(circle)


def test_no_module_of_the_sidecar_grows_past_its_bound() -> None:
    over = {}
    for path in sources("reconciler"):
        name = str(path.relative_to(ROOT))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > LONG_MODULES.get(name, MODULE_LINES):
            over[name] = lines
    assert not over, f"over {MODULE_LINES} lines (or past their bound in LONG_MODULES): {over}"
