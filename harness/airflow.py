"""A real Airflow (any of harness/locks.py's: 3.3, 3.2, 3.1, 3.0, 2.11, 2.10) on loopback: cached venv,
the project installed, all started.

The venv lives under ``$AGENTIC_CACHE`` (default ``~/.cache/agentic-airflow``), keyed by version, and is
installed from the version's lock on first use and whenever the lock changes (about 30 s); the project
is reinstalled into it on every start so DAGs import the code of this checkout.

Every version gets a metadata database of its own on the PostgreSQL server (``$AGENTIC_TEST_POSTGRES``,
an admin URL, default the local server), dropped again on stop: Airflow 2 would be held to the
SequentialExecutor on SQLite, and Airflow 3's LocalExecutor on SQLite fails its own components with
"database is locked" once a few writers meet (the triggerer was seen to exit on it), which production
Airflows, on PostgreSQL or MySQL, never see. ``extra_env`` naming ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``
brings a database of the caller's instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import create_engine, make_url, text

from harness.locks import AIRFLOW_PINS, LockError, airflow_requirements, differs_from, digest, pins
from harness.processes import free_port, start, stop_tree, wait_http_ok
from harness.sidecar import SidecarProcess

# CI's matrix: the newest Airflow and the two fastest older series (README's compatibility table). The
# others run by AGENTIC_AIRFLOW_VERSIONS (selected_versions; "all" for every supported one).
AIRFLOW_VERSION = "3.3.2"
AIRFLOW_3_1_VERSION = "3.1.8"  # no keyset cursor on the task-instance list: pages by offset only
AIRFLOW_2_VERSION = "2.11.2"
SUPPORTED_VERSIONS = tuple(AIRFLOW_PINS)  # each with its lock: 3.3.2, 3.2.2, 3.1.8, 3.0.6, 2.11.2, 2.10.5
VERSIONS_ENV = "AGENTIC_AIRFLOW_VERSIONS"
REPO_ROOT = Path(__file__).resolve().parent.parent
# What the project's wheel holds (pyproject.toml's packages), copied to build it.
PROJECT_PACKAGES = (
    *("agent", "agent_api", "sidecar_api", "servicekit", "reconciler", "router_db", "agentic_airflow"),
    "agentic_cli",
)
USERNAME = PASSWORD = "admin"  # a throwaway Airflow on loopback, for tests and the demo only
USERS_CREATE = "users-create"
JWT_SECRET = "agentic-harness-jwt-secret-" + "x" * 40  # >= 64 bytes, or PyJWT warns on every token
# An explicit fernet key, as production sets one: connections and variables are stored encrypted, and
# the e2e tests cover what a newer cryptography does to an older Airflow's fernet (harness/locks.py).
FERNET_KEY = "YWdlbnRpYy1oYXJuZXNzLWZlcm5ldC1rZXktMzJieXQ="  # urlsafe base64 of 32 bytes
POSTGRES_ADMIN_URL = os.environ.get(
    "AGENTIC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def major(version: str) -> int:
    return int(version.split(".", 1)[0])


def api_version(version: str) -> str:
    """The stable REST API an Airflow version serves: ``v2`` on Airflow 3, ``v1`` on Airflow 2."""
    return "v1" if major(version) == 2 else "v2"


def selected_versions(default: Sequence[str]) -> list[str]:
    """The Airflow versions a test module runs on: ``$AGENTIC_AIRFLOW_VERSIONS`` (comma-separated full
    versions, e.g. ``2.10.5``, or ``all`` for every supported one) when set, else ``default`` (CI's)."""
    chosen = [v.strip() for v in os.environ.get(VERSIONS_ENV, "").split(",") if v.strip()]
    if chosen == ["all"]:
        return list(SUPPORTED_VERSIONS)
    for version in chosen:
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{VERSIONS_ENV}: {version!r} is not a supported Airflow ({', '.join(SUPPORTED_VERSIONS)}, "
                "or all); a new one needs a lock: harness/locks.py"
            )
    return chosen or list(default)


def cache_dir() -> Path:
    # An empty AGENTIC_CACHE is unset, as scripts/ensure-tools reads it (not the current directory).
    return Path(os.environ.get("AGENTIC_CACHE") or Path.home() / ".cache" / "agentic-airflow")


@contextmanager
def venv_lock(venv: Path) -> Iterator[None]:
    """Serialise installs into one cached venv between concurrent test runs."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_venv(version: str = AIRFLOW_VERSION) -> Path:
    """The cached Airflow venv for ``version``, installed from its lock (``locks/airflow-V.txt``, see
    harness/locks.py) when missing or when the lock changed; concurrent callers wait."""
    lock = airflow_requirements(version)
    venv = cache_dir() / f"airflow-{version}"
    with venv_lock(venv):
        done = venv / ".complete"
        if not done.exists() or done.read_text() != digest(lock):
            print(f"installing Airflow {version} into {venv} from {lock.name} (~30 s)", file=sys.stderr)
            _run([sys.executable, "-m", "venv", "--clear", str(venv)])
            pip = str(venv / "bin/pip")
            _run([pip, "install", "-q", f"pip=={pins(lock)['pip']}"])
            # The lock pins the build backends too: a package built from source gets the locked ones.
            _run([pip, "install", "-q", "-r", str(lock), "--build-constraint", str(lock)])
            if differences := differs_from(lock, venv):
                raise LockError(f"{venv} differs from {lock.name}: {'; '.join(differences[:5])}")
            done.write_text(digest(lock))
    return venv


def project_digest() -> str:
    """What the project's sources are now: the packages installed into Airflow and their metadata."""
    hashed = hashlib.sha256()
    files = [REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md"]
    for package in PROJECT_PACKAGES:
        files += sorted(
            p for p in (REPO_ROOT / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    for path in files:
        hashed.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return hashed.hexdigest()


def install_project(venv: Path) -> None:
    """Install this checkout into the Airflow venv (its dependencies are none: the operator needs only
    httpx, which Airflow ships; ``--no-deps`` keeps ``--force-reinstall`` from reinstalling Airflow's).

    Only when the sources differ from what the venv holds: a reinstall removes the package for a moment,
    and another test's Airflow running from the same venv would fail to import its DAG then (Airflow 3
    reschedules such a task a minute later). From a copy of the sources: a build in the checkout would
    reuse its ``build/`` (where setuptools keeps modules since deleted) and race another worker's
    build. The venv's own locked setuptools builds it (``--no-build-isolation``), so nothing is fetched
    at each start."""
    stamp = venv / ".agentic-project"
    with venv_lock(venv):
        wanted = project_digest()
        if stamp.exists() and stamp.read_text() == wanted:
            return
        _install_copy(venv)
        stamp.write_text(wanted)


def _install_copy(venv: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="agentic-src-") as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO_ROOT / name, source / name)
        skipped = shutil.ignore_patterns("__pycache__")
        for package in PROJECT_PACKAGES:
            shutil.copytree(REPO_ROOT / package, source / package, ignore=skipped)
        pip = str(venv / "bin/pip")
        _run([pip, "install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall", str(source)])


def _run(argv: list[str], env: Mapping[str, str] | None = None) -> None:
    result = subprocess.run(
        argv, env=dict(env) if env is not None else None, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@dataclass
class AirflowServer:
    """A whole Airflow on 127.0.0.1, started as separate processes.

    Airflow 3: api-server, scheduler, dag-processor and triggerer. Airflow 2: webserver, scheduler
    and triggerer. Metadata in a fresh PostgreSQL database.
    ``venv`` defaults to the cached venv of ``version``.
    """

    home: Path
    dags_folder: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    venv: Path | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    version: str = AIRFLOW_VERSION
    database: str = ""  # the PostgreSQL metadata database this server created, while it exists
    # Connections stored in the metadata DB (``airflow connections add``) before the servers start:
    # encrypted with FERNET_KEY, as production stores them, unlike AIRFLOW_CONN_* in extra_env.
    connections: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if major(self.version) not in (2, 3):
            raise ValueError(f"unsupported Airflow version {self.version}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_version(self) -> str:
        return api_version(self.version)

    @property
    def venv_path(self) -> Path:
        if self.venv is None:
            self.venv = ensure_venv(self.version)
        return self.venv

    def env(self) -> dict[str, str]:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",  # the default 32 forks 32 idle workers
                "AIRFLOW__CORE__FERNET_KEY": FERNET_KEY,
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "PATH": f"{self.venv_path / 'bin'}:{env.get('PATH', '')}",
            }
        )
        env.update(self._env_airflow3() if major(self.version) == 3 else self._env_airflow2())
        if self.database:
            driver = "postgresql+psycopg2"  # Airflow's sync engine; Airflow 3 derives asyncpg from it
            url = make_url(POSTGRES_ADMIN_URL).set(drivername=driver, database=self.database)
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = url.render_as_string(hide_password=False)
        env.update(self.extra_env)
        return env

    def _env_airflow3(self) -> dict[str, str]:
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({USERNAME: PASSWORD}))
        return {
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
            "AIRFLOW__API__SECRET_KEY": "agentic-harness-secret-key",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__TRIGGERER__CAPACITY": "200",
        }

    def _env_airflow2(self) -> dict[str, str]:
        if not self.database and "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in self.extra_env:
            raise RuntimeError("Airflow 2's database is not created yet (call start())")
        return {
            "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
            "AIRFLOW__API__AUTH_BACKENDS": (
                "airflow.providers.fab.auth_manager.api.auth.backend.basic_auth,"
                "airflow.api.auth.backend.session"
            ),
            "AIRFLOW__WEBSERVER__WEB_SERVER_HOST": "127.0.0.1",
            "AIRFLOW__WEBSERVER__WEB_SERVER_PORT": str(self.port),
            "AIRFLOW__WEBSERVER__BASE_URL": self.url,
            "AIRFLOW__WEBSERVER__SECRET_KEY": "agentic-harness-secret-key",
            # Notice new DAG files within seconds (default 300 s); the files present at start are
            # parsed at once either way.
            "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "5",
            "AIRFLOW__TRIGGERER__DEFAULT_CAPACITY": "200",  # renamed [triggerer] capacity in Airflow 3
        }

    def start(self, *, timeout: float = 90.0) -> None:
        venv = self.venv_path
        install_project(venv)
        airflow = str(venv / "bin/airflow")
        logs = self.home / "logs-harness"
        if "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in self.extra_env and not self.database:
            self.database = _create_database()
        env = self.env()
        _run([airflow, "db", "migrate"], env)
        if self.connections:
            self._store_connections(airflow, env)
        if major(self.version) == 3:
            commands = {
                "api-server": [airflow, "api-server", "-H", "127.0.0.1", "-p", str(self.port), "-w", "1"],
                "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
                "dag-processor": [airflow, "dag-processor"],
                "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
            }
            health, server = f"{self.url}/api/v2/monitor/health", "api-server"
        else:
            user = ["-u", USERNAME, "-p", PASSWORD, "-r", "Admin", "-f", "Agentic", "-l", "Harness"]
            commands = {
                # Only API calls need the user (basic auth): create it while the servers start (~5 s).
                USERS_CREATE: [airflow, "users", "create", *user, "-e", "admin@example.com"],
                "webserver": [airflow, "webserver", "-H", "127.0.0.1", "-p", str(self.port), "-w", "1"],
                "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
                "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
            }
            health, server = f"{self.url}/api/v1/health", "webserver"
        for name, argv in commands.items():
            self.procs[name] = start(argv, log_path=logs / f"{name}.log", env=env)
        wait_http_ok(health, timeout=timeout, proc=self.procs[server])
        if USERS_CREATE in self.procs:
            if self.procs[USERS_CREATE].wait(timeout=timeout) != 0:
                raise RuntimeError(f"airflow users create failed; see {logs / USERS_CREATE}.log")
            del self.procs[USERS_CREATE]

    def _store_connections(self, airflow: str, env: Mapping[str, str]) -> None:
        """``airflow connections import`` from a 0600 file, deleted at once: a URI on the command line
        (``connections add --conn-uri``) shows its token in ``ps``, and Airflow echoes it back."""
        path = self.home / "connections.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(dict(self.connections), file)
        try:
            result = subprocess.run(
                [airflow, "connections", "import", str(path)], env=dict(env), capture_output=True, text=True
            )
        finally:
            path.unlink()
        if result.returncode != 0:
            said = result.stdout[-2000:] + result.stderr[-2000:]
            for uri in self.connections.values():
                said = said.replace(uri, "<uri>").replace(urlsplit(uri).password or "\0", "***")
            raise RuntimeError(f"airflow connections import failed:\n{said}")

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_tree(proc)
        self.procs.clear()
        if self.database:
            _drop_database(self.database)
            self.database = ""

    def api(self) -> AirflowAPI:
        return AirflowAPI(self.url, version=self.version)

    def migrate(self) -> None:
        """``airflow db migrate`` on this server's metadata database, starting nothing."""
        _run([str(self.venv_path / "bin/airflow"), "db", "migrate"], self.env())

    def start_api_server(self, *, timeout: float = 90.0) -> None:
        """Only Airflow 3's api-server, on a metadata database migrated already: an Airflow that
        answers reads while no scheduler or triggerer changes the data under it. ``stop()`` stops it."""
        if major(self.version) != 3:
            raise ValueError(f"start_api_server needs Airflow 3, not {self.version}")
        argv = [str(self.venv_path / "bin/airflow"), "api-server", "-H", "127.0.0.1", "-p", str(self.port)]
        log_path = self.home / "logs-harness" / "api-server.log"
        self.procs["api-server"] = start([*argv, "-w", "1"], log_path=log_path, env=self.env())
        wait_http_ok(f"{self.url}/api/v2/monitor/health", timeout=timeout, proc=self.procs["api-server"])


def postgres_url(database: str | None = None, *, drivername: str = "postgresql") -> str:
    """``POSTGRES_ADMIN_URL`` for ``database`` (default: the admin database) and ``drivername``;
    the default ``postgresql`` is a libpq URL, as psycopg takes it."""
    url = make_url(POSTGRES_ADMIN_URL).set(drivername=drivername)
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def create_database(name: str) -> None:
    """Create database ``name`` on the PostgreSQL server; the caller drops it (``drop_database``)."""
    _admin_sql(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    """Drop database ``name`` if it exists, closing its connections."""
    _drop_database(name)


def database_exists(name: str) -> bool:
    engine = create_engine(POSTGRES_ADMIN_URL)
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name})
            return found.first() is not None
    finally:
        engine.dispose()


def _create_database() -> str:
    name = f"agentic_airflow_{uuid.uuid4().hex[:12]}"
    _admin_sql(f'CREATE DATABASE "{name}"')
    return name


def _drop_database(name: str) -> None:
    _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin_sql(statement: str) -> None:
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


class AirflowAPI:
    """What a person does in the UI, through the stable REST API: v2 (JWT) on Airflow 3, v1 (basic
    auth) on Airflow 2. Paths below are relative to ``/api/v2`` or ``/api/v1``, the same in both."""

    def __init__(self, url: str, *, version: str = AIRFLOW_VERSION) -> None:
        self.version = version
        self.api_version = api_version(version)
        if self.api_version == "v1":
            self.http = httpx.Client(base_url=f"{url}/api/v1", auth=(USERNAME, PASSWORD), timeout=30)
            return
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
        if self.api_version == "v1":
            unpause = self.http.patch(
                f"/dags/{dag_id}", params={"update_mask": "is_paused"}, json={"is_paused": False}
            )
            body: dict[str, Any] = {"dag_run_id": run_id, "conf": {}}
        else:
            unpause = self.http.patch(f"/dags/{dag_id}", json={"is_paused": False})
            body = {"dag_run_id": run_id, "logical_date": None, "conf": {}}
        unpause.raise_for_status()
        self.http.post(f"/dags/{dag_id}/dagRuns", json=body).raise_for_status()

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

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """The task's log as the UI shows it (worker and triggerer parts together), one event a line."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        json_please = {"Accept": "application/json"}
        response = self.http.get(path, params={"full_content": "true"}, headers=json_please)
        response.raise_for_status()
        content = response.json()["content"]
        if isinstance(content, str):  # Airflow 2: the text itself
            return content
        return "\n".join(str(e.get("event", "")) if isinstance(e, dict) else str(e) for e in content)

    def mark(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        """Exactly what the UI's "mark failed/success" does; clicked again after a 5xx, as a person
        would (Airflow 3 on SQLite answers 500 when its database is locked by another writer)."""
        body: dict[str, Any] = {"new_state": state}
        if self.api_version == "v1":
            body["dry_run"] = False  # v1 only reports what it would change unless told otherwise
        for attempt in range(5):
            response = self.http.patch(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}", json=body)
            if response.status_code < 500 or attempt == 4:
                break
            time.sleep(0.1)
        response.raise_for_status()

    def clear(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        """What the UI's "clear" does to one task of one run, whatever its state; the cleared TIs.

        A running task goes to ``restarting``, a deferred or finished one to no state; the scheduler
        then runs it again as a new try (``try_number`` + 1).
        """
        response = self.http.post(
            f"/dags/{dag_id}/clearTaskInstances",
            json={
                "dry_run": False,  # defaults to true in both versions
                "task_ids": [task_id],
                "dag_run_id": run_id,
                "only_failed": False,  # defaults to true: would skip a running or deferred task
                "reset_dag_runs": True,  # a finished run goes back to queued, as in the UI
            },
        )
        response.raise_for_status()
        return list(response.json()["task_instances"])

    def delete_run(self, dag_id: str, run_id: str, *, attempts: int = 5) -> None:
        """Delete a DAG run, its task instances with it.

        Airflow 3 refuses to delete a running run (409) but accepts a queued one; setting the run
        to queued leaves its task instances untouched (marking it failed would fail them first).
        Airflow 2 deletes a run in any state.
        """
        path = f"/dags/{dag_id}/dagRuns/{run_id}"
        for _ in range(attempts):
            response = self.http.delete(path)
            if response.status_code == 409 and self.api_version == "v2":
                # The scheduler may move the run back to running between the two calls: try again.
                self.http.patch(path, json={"state": "queued"}).raise_for_status()
                continue
            response.raise_for_status()
            return
        raise RuntimeError(f"DAG run {dag_id}/{run_id} still not deletable after {attempts} attempts")


@contextmanager
def running_airflow(
    base: Path, dags_folder: Path, extra_env: Mapping[str, str], *, version: str = AIRFLOW_VERSION
) -> Iterator[AirflowServer]:
    server = AirflowServer(
        home=base / "airflow-home", dags_folder=dags_folder, extra_env=extra_env, version=version
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def airflow_with_sidecar(
    sidecar: SidecarProcess,
    *,
    home: Path,
    dags_folder: Path,
    version: str = AIRFLOW_VERSION,
    conn_id: str = "agentic_run_default",
) -> Iterator[AirflowServer]:
    """A real Airflow whose connection ``conn_id`` points at ``sidecar``, then the sidecar reading
    that Airflow (its API version set to match); both stopped on the way out."""
    airflow = AirflowServer(
        home=home,
        dags_folder=dags_folder,
        version=version,
        connections={conn_id: f"http://:{sidecar.token}@127.0.0.1:{sidecar.port}"},
    )
    sidecar.api_version = airflow.api_version
    try:
        airflow.start()
        sidecar.airflow_url = airflow.url
        sidecar.start()
        yield airflow
    finally:
        sidecar.stop()
        airflow.stop()
