"""docs/*.md: links resolve, and the monitoring guide lists exactly the real metrics and alerts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agent_api.registration import MAX_LABELS
from reconciler.metrics import Metrics

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    found = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}
    return found | set(re.findall(r'<a id="([^"]+)"></a>', text))


def table_column(path: Path, header: str) -> set[str]:
    """The first column of the Markdown table whose header row starts with ``header``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    column = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        column.add(line.split("|")[1].strip().strip("`"))
    return column


def test_every_relative_link_resolves() -> None:
    for guide in GUIDES:
        for target in re.findall(r"\]\(([^)\s]+)\)", guide.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (guide.parent / file).resolve() if file else guide
            assert path.exists(), f"{guide.name}: broken link {target}"
            if anchor:
                assert anchor in anchors(path), f"{guide.name}: no #{anchor} in {path.name}"


def test_the_monitoring_guide_lists_every_metric_and_alert() -> None:
    families = {f.name: f.type for f in Metrics().registry.collect()}
    exported = {f"{name}_total" if kind == "counter" else name for name, kind in families.items()}
    assert table_column(DOCS / "monitoring.md", "metric") == exported
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text(encoding="utf-8"))
    alerts = {rule["alert"] for group in groups["groups"] for rule in group["rules"]}
    assert table_column(DOCS / "monitoring.md", "alert") == alerts


def test_the_deployment_guide_shows_the_airflow_side() -> None:
    text = (DOCS / "deployment.md").read_text(encoding="utf-8")
    assert "AIRFLOW_CONN_AGENTIC_RUN_DEFAULT='http://:<token>@sidecar-host:8790'" in text
    assert "examples/dags/agentic_example.py" in text and (ROOT / "examples/dags/agentic_example.py").exists()
    assert "airflow providers list" in text
    for example in ("deploy/kubernetes", "deploy/compose", "deploy/systemd/agentic-agent.service"):
        assert example in text and (ROOT / example).exists(), example


def test_the_capacity_gauges_label_sets_are_said_to_come_from_heartbeats_too() -> None:
    """Registered agents' heartbeats carry their labels: the label sets are not the configuration's
    alone, and what bounds them (one set per agent, MAX_LABELS labels each, silent agents forgotten)
    is said."""
    rows = [
        line
        for line in (DOCS / "monitoring.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `reconciler_agent_capacity` |")
    ]
    assert len(rows) == 1
    row = rows[0]
    assert "never from requests" not in row
    assert "heartbeat" in row and "[[agents]]" in row
    assert f"{MAX_LABELS} labels" in row and "forget_after_seconds" in row
