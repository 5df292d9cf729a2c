"""The reconciler sidecar as a real process, configured through a TOML file like in production.

HTTPS: pass ``tls_cert_file`` and ``tls_key_file``, and ``ca_file`` (the CA that signed the
certificate) so that the harness and :meth:`SidecarProcess.client` can verify it. Tokens: the
sidecar accepts ``accepted_tokens`` (default: just ``token``); ``token`` is what ``client()`` sends.
With ``token_file`` (``[http] token_file``) it reads the tokens it accepts from that file instead, and
an :class:`AgentRef` with a ``token_file`` makes it read the token it sends that agent from the file.
``viewer_token`` (``[http] viewer_token_env``) logs in to its pages under /ui/ only.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.processes import free_port, start, stop_tree, wait_http_ok


@dataclass(frozen=True)
class AgentRef:
    id: str
    url: str
    token: str
    labels: Sequence[str] = ()
    ca_file: Path | None = None  # [[agents]] ca_file, for an agent served over https
    token_file: Path | None = None  # [[agents]] token_file: read instead of ``token``


@dataclass
class SidecarProcess:
    workdir: Path
    airflow_url: str
    airflow_password: str
    agents: Sequence[AgentRef]
    db_url: str = ""
    interval_seconds: float = 1.0
    # Written only when set; otherwise the reconciler's defaults apply.
    api_version: str | None = None  # [airflow] api_version: "v2" (Airflow 3), "v1" (Airflow 2), "auto"
    full_resync_seconds: float | None = None  # [poll] full_resync_seconds: the full read's period
    strategy: str | None = None  # [poll] strategy: "targeted" (the default), "incremental", ...
    lease_seconds: float | None = None  # [leader] lease_seconds: how soon a standby takes over
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    accepted_tokens: Sequence[str] | None = None  # what the sidecar accepts; default [token]
    token_file: Path | None = None  # [http] token_file: the tokens accepted, instead of accepted_tokens
    viewer_token: str | None = None  # [http] viewer_token_env's value: logs in to the pages only
    fleet_token: str | None = None  # [fleet] registration_token_env's value: agents may register
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    ca_file: Path | None = None  # verifies the sidecar's certificate (harness and client())
    rate_limit_per_second: float | None = None  # [http] rate_limit_per_second, written when set
    rate_limit_burst: int | None = None
    # TOML appended verbatim: whole sections the fields above do not write (e.g. "[fleet]\n...").
    extra_config: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert_file is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file is not None else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "sidecar.log"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        db_url = self.db_url or f"sqlite:///{self.workdir / 'router.db'}"
        lines = [
            "[airflow]",
            f'base_url = "{self.airflow_url}"',
            *([f'api_version = "{self.api_version}"'] if self.api_version is not None else []),
            'username = "admin"',
            'password_env = "HARNESS_AIRFLOW_PASSWORD"',
            "[router_db]",
            f'url = "{db_url}"',
            "[poll]",
            f"interval_seconds = {self.interval_seconds}",
            *([f'strategy = "{self.strategy}"'] if self.strategy is not None else []),
            *(
                [f"full_resync_seconds = {self.full_resync_seconds}"]
                if self.full_resync_seconds is not None
                else []
            ),
            "[http]",
            f"port = {self.port}",
            'token_env = "HARNESS_SIDECAR_TOKEN"',
            *([f'token_file = "{self.token_file}"'] if self.token_file is not None else []),
            'viewer_token_env = "HARNESS_VIEWER_TOKEN"',
            *(
                [f'tls_cert_file = "{self.tls_cert_file}"', f'tls_key_file = "{self.tls_key_file}"']
                if self.tls_cert_file is not None
                else []
            ),
            *(
                [f"rate_limit_per_second = {self.rate_limit_per_second}"]
                if self.rate_limit_per_second is not None
                else []
            ),
            *([f"rate_limit_burst = {self.rate_limit_burst}"] if self.rate_limit_burst is not None else []),
        ]
        for agent in self.agents:
            labels = ", ".join(f'"{label}"' for label in agent.labels)
            lines += [
                "[[agents]]",
                f'id = "{agent.id}"',
                f'url = "{agent.url}"',
                f'token_env = "HARNESS_AGENT_TOKEN_{agent.id.upper().replace("-", "_")}"',
                f"labels = [{labels}]",
                *([f'ca_file = "{agent.ca_file}"'] if agent.ca_file is not None else []),
                *([f'token_file = "{agent.token_file}"'] if agent.token_file is not None else []),
            ]
        if self.lease_seconds is not None:
            lines += ["[leader]", f"lease_seconds = {self.lease_seconds}"]
        path = self.workdir / "reconciler.toml"
        path.write_text("\n".join(lines) + "\n" + self.extra_config)
        return path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HARNESS_AIRFLOW_PASSWORD"] = self.airflow_password
        tokens = self.accepted_tokens if self.accepted_tokens is not None else [self.token]
        env["HARNESS_SIDECAR_TOKEN"] = ",".join(tokens)
        env.pop("HARNESS_VIEWER_TOKEN", None)
        env.pop("AGENTIC_FLEET_TOKEN", None)
        if self.fleet_token is not None:
            env["AGENTIC_FLEET_TOKEN"] = self.fleet_token
        if self.viewer_token is not None:
            env["HARNESS_VIEWER_TOKEN"] = self.viewer_token
        for agent in self.agents:
            env[f"HARNESS_AGENT_TOKEN_{agent.id.upper().replace('-', '_')}"] = agent.token
        return env

    def start(self) -> None:
        config = self.write_config()
        self.proc = start(
            [sys.executable, "-m", "reconciler", "run", "--config", str(config)],
            log_path=self.log_path,
            env=self.env(),
        )
        wait_http_ok(f"{self.url}/healthz", timeout=30, proc=self.proc, context=self.ssl_context())

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc, grace=35)
            self.proc = None

    def client(self, token: str | None = None) -> httpx.Client:
        """A client of the sidecar's API sending ``token`` (default: ``self.token``)."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=30,
            verify=self.ssl_context() or True,
        )

    def __enter__(self) -> SidecarProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
