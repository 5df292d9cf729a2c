"""deploy/: the Kubernetes example, the docker-compose example and the systemd units, checked offline.

Kubernetes manifests are validated against Kubernetes' own schemas (strict: unknown fields fail), the
compose file against the Compose specification, the units with ``systemd-analyze verify``; every
configuration file they carry goes through the project's real config loaders, with the secrets the
manifests provide (and nothing else).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent import config as agent_config
from reconciler.config import load_secrets, parse_config
from tests.certs import make_ca

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose"
SYSTEMD = ROOT / "deploy" / "systemd"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the example must work on


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def k8s_resource(kind: str, name: str) -> dict[str, Any]:
    for docs in k8s_documents().values():
        for doc in docs:
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {K8S}")


def pod_template() -> dict[str, Any]:
    return k8s_resource("Deployment", "airflow-scheduler")["spec"]["template"]  # type: ignore[no-any-return]


def container(name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_template()["spec"]["containers"] if c["name"] == name]
    return found  # type: ignore[no-any-return]


def reconciler_toml() -> dict[str, Any]:
    config_map = k8s_resource("ConfigMap", "agentic-reconciler-config")
    return tomllib.loads(config_map["data"]["reconciler.toml"])


# ----------------------------------------------------------------------------------- Kubernetes


@pytest.mark.fast
def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    for name, docs in k8s_documents().items():
        assert docs, f"{name} is empty"
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")


@pytest.mark.fast
def test_kustomization_applies_everything_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    expected = {name for name in k8s_documents() if not name.endswith(".example.yaml")}
    assert set(kustomization["resources"]) == expected


@pytest.mark.fast
def test_every_container_has_resources_probes_and_runs_as_non_root() -> None:
    spec = pod_template()["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        where = f"container {c['name']}"
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), f"{where}: requests"
        assert "memory" in c["resources"]["limits"], f"{where}: memory limit"
        if c in spec["containers"]:  # an init container runs to its end: Kubernetes refuses probes there
            assert "livenessProbe" in c, f"{where}: livenessProbe"
        if c.get("ports"):
            assert "readinessProbe" in c, f"{where} serves a port: readinessProbe"
        security = c["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.fast
def test_the_sidecar_probes_health_and_readiness_on_its_own_port() -> None:
    sidecar = container("reconciler")
    (port,) = sidecar["ports"]
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert sidecar["args"] == [
        "python",
        "-m",
        "reconciler",
        "run",
        "--config",
        "/etc/agentic/reconciler.toml",
    ]
    assert sidecar["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    config = parse_config(reconciler_toml(), {})
    assert config.http.port == port["containerPort"] and config.http.host == "0.0.0.0"
    assert config.router_db.url.startswith("postgresql+psycopg://")
    assert ":" not in config.router_db.url.split("//", 1)[1].split("@")[0], "no password in the URL"


@pytest.mark.fast
def test_prometheus_scrapes_the_sidecar_port() -> None:
    annotations = pod_template()["metadata"]["annotations"]
    (port,) = container("reconciler")["ports"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.fast
def test_the_secret_gives_the_sidecar_every_secret_its_config_names(tmp_path: Path) -> None:
    raw = reconciler_toml()
    secret = k8s_resource("Secret", "agentic-reconciler-secrets")
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}, "the example Secret holds no real value"
    env: dict[str, str] = {}
    for var in container("reconciler")["env"]:
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "agentic-reconciler-secrets" and ref["key"] in secret["stringData"], var
        env[var["name"]] = f"value-of-{ref['key']}"
    # The tokens come as files (followed while the sidecar runs): the Secret mounted with items.
    mounts = {m["name"]: m["mountPath"] for m in container("reconciler")["volumeMounts"]}
    provided: dict[str, str] = {}  # path in the container -> key of the Secret
    for volume in pod_template()["spec"]["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] == "agentic-reconciler-secrets"
            for item in volume["secret"]["items"]:
                assert item["key"] in secret["stringData"], item
                provided[f"{mounts[volume['name']]}/{item['path']}"] = item["key"]
    for table in [raw["http"], *raw["agents"]]:  # each token file named, written where the test can read
        if "token_file" in table:
            key = provided[table["token_file"]]  # KeyError: a file the pod does not have
            (tmp_path / key).write_text(f"value-of-{key}\n")
            table["token_file"] = str(tmp_path / key)
    secrets = load_secrets(parse_config(raw, {}), env)  # raises ConfigError naming the first one missing
    assert set(secrets.agent_tokens) == {a["id"] for a in raw["agents"]}
    assert secrets.agent_tokens["vm-01"].current() == "value-of-agent-token-vm-01"
    assert "PGPASSWORD" in env, "the router DB password reaches libpq through PGPASSWORD"


@pytest.mark.fast
def test_the_service_reaches_the_sidecar() -> None:
    service = k8s_resource("Service", "agentic-reconciler")
    labels = pod_template()["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = container("reconciler")["ports"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"] and service_port["port"] == port["containerPort"]
    volume = pod_template()["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == "agentic-reconciler-config"


# ---------------------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_compose_file_matches_the_compose_specification() -> None:
    checker = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE / "docker-compose.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.fast
def test_compose_runs_airflow_3_the_sidecar_two_agents_and_postgres() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert "apache/airflow:3." in services["airflow-api-server"]["build"]["dockerfile_inline"]
    for name in ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert name in services
    agents = [name for name, s in services.items() if s.get("command", [])[:3] == ["python", "-m", "agent"]]
    assert agents == ["agent-1", "agent-2"]
    for name in agents:
        env = services[name]["environment"]
        assert env["AGENTIC_AGENT_ID"] == name
        assert env["AGENTIC_HEALTH_URL"] == "http://127.0.0.1:8791/health", "the image's healthcheck"
    for name, service in services.items():
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published} beyond loopback"


@pytest.mark.fast
def test_compose_configs_load_with_the_secrets_compose_mounts(tmp_path: Path) -> None:
    services = compose()["services"]
    config = parse_config(tomllib.loads((COMPOSE / "reconciler.toml").read_text(encoding="utf-8")), {})
    assert {a.id: a.url for a in config.agents} == {
        "agent-1": "http://agent-1:8791",
        "agent-2": "http://agent-2:8791",
    }
    mounted = {f"/run/secrets/{name}" for name in services["reconciler"]["secrets"]}
    files = {config.airflow.password_file, config.http.token_file, *(a.token_file for a in config.agents)}
    assert files <= mounted, files - mounted
    assert config.router_db.url.startswith("postgresql+psycopg://airflow@postgres:5432/")
    assert "PGPASSWORD" in services["reconciler"]["environment"]

    token = tmp_path / "agent_token"
    token.write_text("compose-token\n")
    agent = agent_config.load_config(
        COMPOSE / "agent.toml",
        environ={"AGENTIC_AGENT_ID": "agent-1", "AGENTIC_AGENT_TOKEN_FILE": str(token)},
    )
    assert agent.tokens == ("compose-token",) and agent.port == 8791 and agent.host == "0.0.0.0"
    # The file the override stood in for is the secret compose mounts into both agents.
    configured = tomllib.loads((COMPOSE / "agent.toml").read_text(encoding="utf-8"))["agent"]
    for name in ("agent-1", "agent-2"):
        assert configured["token_file"] == f"/run/secrets/{services[name]['secrets'][0]}"


@pytest.mark.fast
def test_compose_secrets_come_from_the_environment_file_only() -> None:
    text = (COMPOSE / "docker-compose.yaml").read_text(encoding="utf-8")
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env.example").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert set(example.values()) == {"REPLACE_ME"}
    assert set(re.findall(r"\$\{([A-Z0-9_]+)\}", text)) <= set(example)
    for secret in compose()["secrets"].values():
        assert secret["environment"] in example


# ---------------------------------------------------------------------------------------- systemd


UNITS = ["agentic-agent.service", "agentic-reconciler.service"]


def unit(name: str = "agentic-agent.service") -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name, encoding="utf-8")
    return parser


def install_notes(name: str) -> str:
    """The unit's comment header: the install commands."""
    text = (SYSTEMD / name).read_text(encoding="utf-8")
    return text.split("\n[Unit]", 1)[0]


@pytest.mark.fast
def test_the_units_are_the_ones_shipped() -> None:
    assert sorted(path.name for path in SYSTEMD.glob("*.service")) == UNITS


@pytest.mark.fast
def test_restarting_the_agent_leaves_its_jobs_running() -> None:
    service = unit()["Service"]
    assert service["KillMode"] == "process", "the default would kill every job with the agent"
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].endswith("-m agent --config /etc/agentic-agent/agent.toml")
    assert service["User"] != "root"


@pytest.mark.parametrize("name", UNITS)
def test_systemd_accepts_the_unit(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/ensure-tools installs it"
    # The unit names the venv of its install notes; verify it against this machine's Python.
    text = (SYSTEMD / name).read_text(encoding="utf-8")
    copy = tmp_path / name
    copy.write_text(text.replace("/opt/agentic/bin/python", sys.executable))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.fast
def test_the_vm_agent_config_loads_with_tls_and_a_token_file(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "Test CA")
    server = ca.issue(tmp_path / "server", hosts=["vm-01.example.internal"])
    token = tmp_path / "token"
    token.write_text("old-token\nnew-token\n")
    configured = tomllib.loads((SYSTEMD / "agent.toml").read_text(encoding="utf-8"))["agent"]
    assert configured["token_file"] == "/etc/agentic-agent/token"
    # The files the unit's install notes create, moved here through the documented overrides.
    config = agent_config.load_config(
        SYSTEMD / "agent.toml",
        environ={
            "AGENTIC_AGENT_TOKEN_FILE": str(token),
            "AGENTIC_AGENT_TLS_CERT_FILE": str(server.cert_file),
            "AGENTIC_AGENT_TLS_KEY_FILE": str(server.key_file),
        },
    )
    assert config.scheme == "https" and config.host == "0.0.0.0"
    assert config.tokens == ("old-token", "new-token")
    assert str(config.home) == "/var/lib/agentic-agent" == "/var/lib/" + unit()["Service"]["StateDirectory"]
    sidecar = parse_config(reconciler_toml(), {})
    assert config.grace_seconds < sidecar.stop.timeout_seconds, "a stop call must outlast the grace period"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "config"),
    [("agentic-agent.service", "agent.toml"), ("agentic-reconciler.service", "reconciler.toml")],
)
def test_the_install_notes_put_every_file_the_config_names_in_place(name: str, config: str) -> None:
    """A file the config names but the install notes never make stops the service with exit 2, and
    RestartPreventExitStatus=2 keeps it down (the agent's TLS files once were such files)."""
    notes = install_notes(name)
    assert f"deploy/systemd/{config} " in notes, "the notes install the config"

    def paths(value: object) -> list[str]:
        if isinstance(value, dict):
            return [p for v in value.values() for p in paths(v)]
        if isinstance(value, list):
            return [p for v in value for p in paths(v)]
        return [value] if isinstance(value, str) and value.startswith("/etc/") else []

    named = paths(tomllib.loads((SYSTEMD / config).read_text(encoding="utf-8")))
    assert named, config
    for path in named:
        directory, _, file = path.rpartition("/")
        made = path in notes or (
            f"{directory}/$f" in notes and re.search(rf"for f in [^;]*\b{file}\b", notes)
        )
        assert made, f"{config} names {path}, which the install notes of {name} do not create"


@pytest.mark.fast
def test_the_sidecar_unit_runs_the_sidecar_and_stays_down_on_a_config_error() -> None:
    service = unit("agentic-reconciler.service")["Service"]
    assert service["ExecStart"] == (
        "/opt/agentic/bin/python -m reconciler run --config /etc/agentic-reconciler/reconciler.toml"
    )
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "2"
    assert service["User"] not in ("root", unit()["Service"]["User"]), "agent jobs must not read its secrets"
    assert service["WorkingDirectory"] == "/var/lib/" + service["StateDirectory"], (
        "a SQLite router DB lands there"
    )
    assert "pip install './agentic-airflow[sidecar]'" in install_notes("agentic-reconciler.service")


@pytest.mark.fast
def test_the_host_sidecar_config_loads_with_tls_and_secret_files(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    ca = make_ca(etc / "tls", "Test CA")  # etc/tls/ca.pem: the CA of the agents' certificates
    server = ca.issue(etc / "tls", hosts=["sidecar-host"])  # etc/tls/cert.pem, etc/tls/key.pem
    assert (server.cert_file.name, server.key_file.name) == ("cert.pem", "key.pem")
    for name, value in {"token": "t1\nt2\n", "airflow-password": "pw\n", "agent-token-vm-01": "a1\n"}.items():
        (etc / name).write_text(value)
    # The files the unit's install notes create, moved here.
    text = (
        (SYSTEMD / "reconciler.toml").read_text(encoding="utf-8").replace("/etc/agentic-reconciler", str(etc))
    )
    config = parse_config(tomllib.loads(text), {})
    secrets = load_secrets(config, {})
    assert config.http.scheme == "https" and config.http.host == "0.0.0.0"
    assert secrets.http_tokens.current() == ("t1", "t2") and secrets.airflow_password == "pw"
    assert [(a.id, a.url.split(":")[0], a.ca_file) for a in config.agents] == [
        ("vm-01", "https", str(ca.cert_file))
    ]
    assert config.router_db.url.startswith("postgresql+psycopg://")
    assert ":" not in config.router_db.url.split("//", 1)[1].split("@")[0], "no password in the URL"
    agent = agent_config.load_config(
        SYSTEMD / "agent.toml",
        environ={
            "AGENTIC_AGENT_TOKEN_FILE": str(etc / "agent-token-vm-01"),
            "AGENTIC_AGENT_TLS_CERT_FILE": str(server.cert_file),
            "AGENTIC_AGENT_TLS_KEY_FILE": str(server.key_file),
        },
    )
    assert config.agents[0].url.endswith(f":{agent.port}")
    assert agent.grace_seconds < config.stop.timeout_seconds, "a stop call must outlast the grace period"
