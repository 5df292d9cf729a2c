"""deploy/prometheus/alerts.yaml and deploy/grafana/reconciler-dashboard.json against the real metrics.

The metric names come from ``reconciler.metrics.Metrics().registry``: every alert may use only those,
and the dashboard must show every one of them. ``promtool`` (scripts/ensure-tools installs it) checks
the rules, runs a unit test per alert (does it fire when it should, and stay quiet on a healthy
sidecar?), and checks the dashboard's queries parse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "reconciler-dashboard.json"
TOOLS = Path(os.environ.get("AGENTIC_CACHE", Path.home() / ".cache" / "agentic-airflow")) / "tools" / "bin"
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}
LABELS = {"instance": "sidecar:8790", "job": "agentic-reconciler"}


def promtool() -> str:
    found = shutil.which("promtool") or (str(TOOLS / "promtool") if (TOOLS / "promtool").exists() else None)
    if found is None:
        pytest.fail("promtool is missing: run scripts/ensure-tools (scripts/test does)")
    return found


def run_promtool(*args: str, cwd: Path) -> None:
    result = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def exported() -> dict[str, set[str]]:
    """Each metric family the reconciler exports -> the series names Prometheus stores for it."""
    series: dict[str, set[str]] = {}
    for family in Metrics().registry.collect():
        if family.type == "counter":
            series[family.name] = {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            series[family.name] = {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            series[family.name] = {family.name}
    return series


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords or label names)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        is_function = expr[match.end() :].lstrip().startswith("(")
        if not is_function and match.group(0) not in PROMQL_WORDS:
            names.add(match.group(0))
    return names


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def panel_expressions() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


@pytest.mark.fast
def test_the_metric_name_reader_understands_promql() -> None:
    expr = 'sum without (code) (rate(x_total{code!~"2..|y_total"}[5m])) / on(a) group_left(b) z > bool 1'
    assert metric_names(expr) == {"x_total", "z"}
    assert metric_names("time() - max(reconciler_leader) and absent(up)") == {"reconciler_leader", "up"}


# ------------------------------------------------------------------------------------------ alerts


def test_promtool_accepts_the_rules() -> None:
    run_promtool("check", "rules", str(ALERTS), cwd=ALERTS.parent)


@pytest.mark.fast
def test_alerts_use_only_metrics_the_reconciler_exports() -> None:
    known = set().union(*exported().values())
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} reads {unknown}, which the reconciler does not export"


@pytest.mark.fast
def test_alerts_cover_the_failures_operators_must_hear_about() -> None:
    expressions = {rule["alert"]: rule["expr"] for rule in rules()}
    assert any("absent(reconciler_leader)" in e for e in expressions.values()), "reconciler down"
    assert any("reconciler_last_success_timestamp_seconds" in e for e in expressions.values())
    assert any('result="airflow_error"' in e for e in expressions.values())
    assert any("reconciler_airflow_requests_total" in e for e in expressions.values())
    assert any('outcome="rejected"' in e for e in expressions.values())
    assert any('outcome="retry"' in e for e in expressions.values()), "the stop backlog"
    assert any('state="wrong_identity"' in e for e in expressions.values()), "an address reused"
    assert any("reconciler_no_capacity_total" in e for e in expressions.values()), "no agent with room"
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {**LABELS, **labels}
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(all_labels.items()))
    return {"series": f"{name}{{{rendered}}}", "values": values}


HEALTHY = [
    series("reconciler_leader", "1x40"),
    series("reconciler_agents", "0x40", state="lost"),
    series("reconciler_agents", "0x40", state="wrong_identity"),
    series("reconciler_agents", "0x40", state="outdated"),
    series("reconciler_agents_in_maintenance", "0x40", by="agent"),
    series("reconciler_agents_in_maintenance", "1x40", by="operator"),  # maintenance asked for: no alert
    series("reconciler_no_capacity_total", "0x40"),
    series("reconciler_fenced_jobs_total", "0x40"),
    series("reconciler_full_resync_failing", "0x40"),
    series("reconciler_stopping_jobs", "0 2 0 1 0 0 3 0 0x32"),  # stops come and go within a cycle or two
    series("reconciler_last_success_timestamp_seconds", "0+60x40"),
    series("reconciler_cycles_total", "0+60x40", result="ok"),
    series("reconciler_airflow_requests_total", "0+60x40", code="200"),
    series("reconciler_stop_requests_total", "0+1x40", outcome="stopped"),
    series("reconciler_detection_latency_seconds_bucket", "0+1x40", le="1.0"),
    series("reconciler_detection_latency_seconds_bucket", "0+1x40", le="+Inf"),
    series("reconciler_cycle_duration_seconds_bucket", "0+60x40", le="0.5"),
    series("reconciler_cycle_duration_seconds_bucket", "0+60x40", le="+Inf"),
]
# (name, input series, alert, minute it must be firing at, labels it carries besides severity)
SCENARIOS: list[tuple[str, list[dict[str, str]], str, int, dict[str, str]]] = [
    ("nothing scraped", [{"series": 'up{job="other"}', "values": "1x10"}], "AgenticReconcilerDown", 5, {}),
    (
        "no cycle ever succeeded",
        [series("reconciler_leader", "1x10"), series("reconciler_last_success_timestamp_seconds", "0x10")],
        "AgenticReconcilerNoSuccessfulCycle",
        6,
        LABELS,
    ),
    (
        "every cycle fails to read Airflow",
        [
            series("reconciler_cycles_total", "0+60x20", result="airflow_error"),
            series("reconciler_cycles_total", "0x20", result="ok"),
        ],
        "AgenticReconcilerAirflowUnusable",
        10,
        LABELS,
    ),
    (
        "half the requests to Airflow answer 503",
        [
            series("reconciler_airflow_requests_total", "0+10x30", code="503"),
            series("reconciler_airflow_requests_total", "0+10x30", code="200"),
        ],
        "AgenticReconcilerAirflowRequestErrors",
        25,
        LABELS,
    ),
    (
        "the router DB is down",
        [series("reconciler_cycles_total", "0+60x20", result="db_error")],
        "AgenticReconcilerCycleErrors",
        10,
        LABELS,
    ),
    (
        "an agent refuses a stop",
        [series("reconciler_stop_requests_total", "0 0 0 1 1 1 1 1", outcome="rejected")],
        "AgenticStopsRejected",
        4,
        LABELS,
    ),
    (
        "stops cannot reach their agent",
        [series("reconciler_stop_requests_total", "0+1x30", outcome="retry")],
        "AgenticStopsRetrying",
        20,
        LABELS,
    ),
    (
        "stops stay pending for a quarter of an hour",
        [series("reconciler_stopping_jobs", "3x30")],
        "AgenticStopBacklog",
        15,
        LABELS,
    ),
    (
        "an agent stops answering",
        [series("reconciler_agents", "0 0 1 1 1 1 1", state="lost")],
        "AgenticAgentLost",
        4,
        LABELS,
    ),
    (
        "an agent says a version older than the sidecar works with",
        [series("reconciler_agents", "0 0 1 1 1 1 1 1 1 1", state="outdated")],
        "AgenticAgentOutdated",
        8,
        LABELS,
    ),
    (
        "an agent's disk fills up",
        [series("reconciler_agents_in_maintenance", "0 1 1 1 1 1 1 1 1 1 1 1 1 1", by="agent")],
        "AgenticAgentUnwell",
        12,
        LABELS,
    ),
    (
        "a cut-off agent fenced its at_most_once jobs",
        [series("reconciler_fenced_jobs_total", "0 0 2 2 2 2 2")],
        "AgenticJobsFenced",
        3,
        LABELS,
    ),
    (
        "most agents fail at once and their losses are held back",
        [series("reconciler_agents_held", "0 0 4 4 4 4 4")],
        "AgenticAgentLossesHeld",
        5,
        LABELS,
    ),
    (
        "another agent answers at an agent's URL",
        [series("reconciler_agents", "0 0 1 1 1 1 1", state="wrong_identity")],
        "AgenticAgentWrongIdentity",
        4,
        LABELS,
    ),
    (
        "submissions keep finding every agent full",
        [series("reconciler_no_capacity_total", "0+3x30")],
        "AgenticNoCapacity",
        20,
        LABELS,
    ),
    (
        "an agent keeps registering under an id another live agent holds",
        [series("reconciler_agent_heartbeats_total", "0+6x30", result="refused")],
        "AgenticAgentRegistrationRefused",
        20,
        {**LABELS, "result": "refused"},
    ),
    (
        "the full read keeps failing",
        [series("reconciler_full_resync_failing", "1x20")],
        "AgenticFullResyncFailing",
        15,
        LABELS,
    ),
    (
        "detection takes about a minute",
        [
            series("reconciler_detection_latency_seconds_bucket", "0x40", le="30.0"),
            series("reconciler_detection_latency_seconds_bucket", "0+10x40", le="60.0"),
            series("reconciler_detection_latency_seconds_bucket", "0+10x40", le="+Inf"),
        ],
        "AgenticSlowDetection",
        30,
        {"job": LABELS["job"]},
    ),
    (
        "cycles take about 10 s",
        [
            series("reconciler_cycle_duration_seconds_bucket", "0x30", le="5.0"),
            series("reconciler_cycle_duration_seconds_bucket", "0+10x30", le="10.0"),
            series("reconciler_cycle_duration_seconds_bucket", "0+10x30", le="+Inf"),
        ],
        "AgenticSlowCycles",
        25,
        {"job": LABELS["job"]},
    ),
]


def expected_alert(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    annotations = {
        key: text.replace("{{ $labels.instance }}", labels.get("instance", ""))
        for key, text in rule["annotations"].items()
    }
    return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}


def test_each_alert_fires_when_it_should_and_a_healthy_sidecar_raises_none(tmp_path: Path) -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert {alert for _, _, alert, _, _ in SCENARIOS} == set(by_name), "a scenario for every alert"
    tests: list[dict[str, Any]] = [
        {
            "name": "a healthy sidecar raises nothing",
            "interval": "1m",
            "input_series": HEALTHY,
            "alert_rule_test": [
                {"eval_time": "40m", "alertname": name, "exp_alerts": []} for name in by_name
            ],
        }
    ]
    for name, inputs, alert, minute, labels in SCENARIOS:
        others = [other for other in by_name if other != alert]
        tests.append(
            {
                "name": name,
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {"eval_time": "0m", "alertname": alert, "exp_alerts": []},
                    {
                        "eval_time": f"{minute}m",
                        "alertname": alert,
                        "exp_alerts": [expected_alert(by_name[alert], labels)],
                    },
                    # Each failure raises its own alert, not a storm of the others.
                    *(
                        {"eval_time": f"{minute}m", "alertname": other, "exp_alerts": []}
                        for other in others
                        if not (alert == "AgenticReconcilerDown" or other == "AgenticReconcilerDown")
                    ),
                ],
            }
        )
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests})
    )
    run_promtool("test", "rules", str(test_file), cwd=tmp_path)


# --------------------------------------------------------------------------------------- dashboard


@pytest.mark.fast
def test_the_dashboard_shows_every_exported_metric() -> None:
    shown = set().union(*(metric_names(e) for e in panel_expressions()))
    for family, names in exported().items():
        assert shown & names, f"no dashboard panel shows {family}"
    known = set().union(*exported().values())
    assert shown <= known, f"the dashboard reads metrics nobody exports: {shown - known}"


@pytest.mark.fast
def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: the instance filter"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Grafana's variables replaced by values, each query becomes a recording rule promtool must parse."""
    records = [
        {
            "record": f"dashboard:query_{n}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for n, expr in enumerate(panel_expressions())
    ]
    rule_file = tmp_path / "dashboard-queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    run_promtool("check", "rules", str(rule_file), cwd=tmp_path)
