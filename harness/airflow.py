"""A real Airflow 3 on loopback: cached venv, the project installed into it, all components started.

The venv lives under ``$AGENTIC_CACHE`` (default ``~/.cache/agentic-airflow``), keyed by version,
and is created on first use (about 20 s); the project is reinstalled into it on every start so DAGs
import the code of this checkout.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.processes import free_port, start, stop_tree, wait_http_ok

AIRFLOW_VERSION = "3.3.2"
REPO_ROOT = Path(__file__).resolve().parent.parent
USERNAME = PASSWORD = "admin"  # a throwaway Airflow on loopback, for tests and the demo only


def cache_dir() -> Path:
    return Path(os.environ.get("AGENTIC_CACHE", Path.home() / ".cache" / "agentic-airflow"))


def ensure_venv(version: str = AIRFLOW_VERSION) -> Path:
    """The cached Airflow venv for ``version``, created when missing; concurrent callers wait."""
    venv = cache_dir() / f"airflow-{version}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".airflow-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = venv / ".complete"
        if not done.exists():
            print(f"installing Airflow {version} into {venv} (once per machine, ~20 s)", file=sys.stderr)
            _run([sys.executable, "-m", "venv", "--clear", str(venv)])
            _run([str(venv / "bin/pip"), "install", "-q", "-U", "pip"])
            _run([str(venv / "bin/pip"), "install", "-q", f"apache-airflow=={version}"])
            done.touch()
    return venv


def install_project(venv: Path) -> None:
    """Install this checkout into the Airflow venv (no dependencies: the operator needs only httpx)."""
    _run([str(venv / "bin/pip"), "install", "-q", "--no-deps", "--force-reinstall", str(REPO_ROOT)])


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@dataclass
class AirflowServer:
    """Airflow's api-server, scheduler, dag-processor and triggerer, all on 127.0.0.1."""

    home: Path
    dags_folder: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    venv: Path = field(default_factory=ensure_venv)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        self.home.mkdir(parents=True, exist_ok=True)
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({USERNAME: PASSWORD}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__CORE__AUTH_MANAGER": (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__API_AUTH__JWT_SECRET": "agentic-harness-jwt-secret",
                "AIRFLOW__API__SECRET_KEY": "agentic-harness-secret-key",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "AIRFLOW__TRIGGERER__DEFAULT_CAPACITY": "200",
                "PATH": f"{self.venv / 'bin'}:{env.get('PATH', '')}",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, *, timeout: float = 90.0) -> None:
        install_project(self.venv)
        env = self.env()
        airflow = str(self.venv / "bin/airflow")
        logs = self.home / "logs-harness"
        _run_env([airflow, "db", "migrate"], env)
        commands = {
            "api-server": [airflow, "api-server", "-H", "127.0.0.1", "-p", str(self.port), "-w", "1"],
            "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
            "dag-processor": [airflow, "dag-processor"],
            "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
        }
        for name, argv in commands.items():
            self.procs[name] = start(argv, log_path=logs / f"{name}.log", env=env)
        wait_http_ok(f"{self.url}/api/v2/monitor/health", timeout=timeout, proc=self.procs["api-server"])

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_tree(proc)
        self.procs.clear()

    def api(self) -> AirflowAPI:
        return AirflowAPI(self.url)


def _run_env(argv: list[str], env: Mapping[str, str]) -> None:
    result = subprocess.run(argv, env=dict(env), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


class AirflowAPI:
    """What a person does in the UI, through the REST API v2."""

    def __init__(self, url: str) -> None:
        token = httpx.post(f"{url}/auth/token", json={"username": USERNAME, "password": PASSWORD}, timeout=30)
        token.raise_for_status()
        self.http = httpx.Client(
            base_url=f"{url}/api/v2",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=30,
        )

    def wait_for_dag(self, dag_id: str, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http.get(f"/dags/{dag_id}").status_code == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f} s")

    def trigger(self, dag_id: str, run_id: str) -> None:
        self.http.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        response = self.http.post(
            f"/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": {}}
        )
        response.raise_for_status()

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        response.raise_for_status()
        return dict(response.json())

    def wait_for_state(
        self, dag_id: str, run_id: str, task_id: str, states: set[str], *, timeout: float = 90.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        ti: dict[str, Any] = {}
        while time.monotonic() < deadline:
            ti = self.task_instance(dag_id, run_id, task_id)
            if ti["state"] in states:
                return ti
            time.sleep(0.3)
        raise TimeoutError(
            f"{dag_id}/{run_id}/{task_id} not in {states} after {timeout:.0f} s: {ti.get('state')}"
        )

    def mark(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        """Exactly what the UI's "mark failed/success" does."""
        response = self.http.patch(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}", json={"new_state": state}
        )
        response.raise_for_status()


@contextmanager
def running_airflow(base: Path, dags_folder: Path, extra_env: Mapping[str, str]) -> Iterator[AirflowServer]:
    server = AirflowServer(home=base / "airflow-home", dags_folder=dags_folder, extra_env=extra_env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
