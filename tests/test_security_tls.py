"""TLS: the sidecar serves HTTPS with [http] tls_cert_file/tls_key_file, the operator's client verifies
it against the connection's ``ca_file``, and the sidecar reaches an HTTPS agent with [[agents]] ca_file.
Certificates are made at test time (tests/certs.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentic_airflow.sidecar_client import SidecarEndpoint, SidecarError, get_job, submit_job
from harness.agent import AgentProcess
from harness.processes import free_port
from harness.sidecar import AgentRef, SidecarProcess
from reconciler.config import ConfigError, parse_config
from tests.certs import Issued, make_ca


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server: Issued
    other_ca_file: Path  # a CA that signed nothing here


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root / "ca", "Test CA")
    other = make_ca(root / "other", "Other CA")
    return Pki(ca.cert_file, ca.issue(root / "server", hosts=["127.0.0.1", "localhost"]), other.cert_file)


@pytest.fixture(scope="module")
def stand(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProcess, SidecarProcess]]:
    root = tmp_path_factory.mktemp("tls")
    with AgentProcess(
        home=root / "agent",
        agent_id="agent-1",
        tls_cert_file=pki.server.cert_file,
        tls_key_file=pki.server.key_file,
        ca_file=pki.ca_file,
    ) as agent:
        assert agent.url.startswith("https://")
        with SidecarProcess(
            workdir=root / "sidecar",
            airflow_url=f"http://127.0.0.1:{free_port()}",
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"], ca_file=pki.ca_file)],
            interval_seconds=0.3,
            tls_cert_file=pki.server.cert_file,
            tls_key_file=pki.server.key_file,
            ca_file=pki.ca_file,
        ) as sidecar:
            yield agent, sidecar


def submission(task_id: str, command: str = "echo over-tls") -> dict[str, Any]:
    return {
        "command": command,
        "labels": ["default"],
        "dag_id": "tls",
        "task_id": task_id,
        "run_id": "manual__1",
        "try_number": 1,
    }


def endpoint(sidecar: SidecarProcess, extra: dict[str, Any]) -> SidecarEndpoint:
    return SidecarEndpoint.from_connection(
        conn_type="https", host="127.0.0.1", port=sidecar.port, password=sidecar.token, extra=extra
    )


def test_operator_client_with_the_ca_submits_over_https_to_an_https_agent(
    pki: Pki, stand: tuple[AgentProcess, SidecarProcess]
) -> None:
    _, sidecar = stand
    assert sidecar.url.startswith("https://")
    secure = endpoint(sidecar, {"ca_file": str(pki.ca_file)})
    job = submit_job(secure, submission("ok"))
    assert job["status"] == "RUNNING", job  # the sidecar reached the HTTPS agent with [[agents]] ca_file

    async def follow() -> dict[str, Any]:
        verify = secure.verify()
        async with httpx.AsyncClient(
            base_url=secure.base_url, headers=secure.headers, verify=verify
        ) as client:
            deadline = time.monotonic() + 15
            while (answer := await get_job(client, job["job_id"]))["status"] != "SUCCEEDED":
                assert time.monotonic() < deadline, answer
                await asyncio.sleep(0.1)
            return answer

    assert asyncio.run(follow())["rc"] == 0


@pytest.mark.parametrize("extra", [{}, "other"], ids=["system-trust", "wrong-ca"])
def test_operator_client_without_the_right_ca_fails_clearly(
    pki: Pki, stand: tuple[AgentProcess, SidecarProcess], extra: Any
) -> None:
    _, sidecar = stand
    conn_extra = {"ca_file": str(pki.other_ca_file)} if extra == "other" else {}
    with pytest.raises(SidecarError, match="TLS certificate verification failed") as caught:
        submit_job(endpoint(sidecar, conn_extra), submission(f"refused-{extra or 'none'}"))
    assert "ca_file" in str(caught.value) and sidecar.token not in str(caught.value)
    with sidecar.client() as client:  # nothing was submitted
        assert not [
            j
            for j in client.get("/jobs", params={"dag_id": "tls"}).json()["jobs"]
            if "refused" in j["task_id"]
        ]


def test_a_missing_ca_file_in_the_connection_is_named(stand: tuple[AgentProcess, SidecarProcess]) -> None:
    _, sidecar = stand
    with pytest.raises(SidecarError, match=r"ca_file /nonexistent/ca\.pem"):
        submit_job(endpoint(sidecar, {"ca_file": "/nonexistent/ca.pem"}), submission("no-ca"))


def test_plain_http_to_the_https_sidecar_is_refused(stand: tuple[AgentProcess, SidecarProcess]) -> None:
    _, sidecar = stand
    with pytest.raises(httpx.HTTPError):
        httpx.get(sidecar.url.replace("https://", "http://") + "/healthz", timeout=5)


@pytest.mark.parametrize(
    ("http", "key"),
    [
        ({"tls_cert_file": "CERT"}, "tls_key_file"),
        ({"tls_key_file": "KEY"}, "tls_cert_file"),
        ({"tls_cert_file": "/nonexistent/cert.pem", "tls_key_file": "KEY"}, "tls_cert_file"),
        ({"tls_cert_file": "CERT", "tls_key_file": "/nonexistent/key.pem"}, "tls_key_file"),
        ({"tls_cert_file": "GARBAGE", "tls_key_file": "KEY"}, "tls_cert_file, tls_key_file"),
        ({"tls_cert_file": "CERT", "tls_key_file": "CERT"}, "tls_cert_file, tls_key_file"),
    ],
    ids=["key-missing", "cert-missing", "cert-unreadable", "key-unreadable", "cert-not-pem", "key-not-a-key"],
)
@pytest.mark.fast
def test_bad_tls_settings_are_a_config_error_naming_the_key(
    pki: Pki, tmp_path: Path, http: dict[str, str], key: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    files = {"CERT": str(pki.server.cert_file), "KEY": str(pki.server.key_file), "GARBAGE": str(garbage)}
    section = {name: files.get(value, value) for name, value in http.items()}
    with pytest.raises(ConfigError) as caught:
        parse_config({"http": section}, {})
    assert str(caught.value).startswith(f"[http] {key}:"), caught.value


def test_check_config_rejects_half_a_tls_setting(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "reconciler.toml"
    config.write_text(f'[http]\ntls_cert_file = "{pki.server.cert_file}"\n')
    env = {"AIRFLOW_PASSWORD": "x", "AGENTIC_SIDECAR_TOKEN": "y", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode != 0 and "[http] tls_key_file" in result.stderr + result.stdout
