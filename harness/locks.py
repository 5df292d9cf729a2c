"""Locked environments: the project's own venv, and one venv per supported Airflow version.

A lock is the ``pip freeze --all`` of an environment that passed the tests, kept in ``locks/``. The
project's venv is installed with its lock as constraints (``pip install -c locks/dev.txt -e .[dev]``),
each Airflow venv from its lock as requirements, which stands in for Airflow's constraints file (it
cannot be fetched here). A fresh machine then resolves exactly what CI tested, whatever was released
since. ``scripts/lock`` refreshes them on purpose, and each lock's first line records when.

The pins below are what each Airflow needs beyond itself when installed without Airflow's constraints,
each with its reason (docs: README's compatibility table). A refresh resolves under them.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCKS = REPO_ROOT / "locks"
DEV_LOCK = LOCKS / "dev.txt"
PROJECT = "agentic-airflow"

# cryptography 51 made MultiFernet a Rust class; Airflow before 3.3 sets `_fernet.is_encrypted = True`
# on it, so with a fernet key set every connection fails to parse (and looks "not defined").
_FERNET = "cryptography<51"
# Airflow's metadata DB is PostgreSQL in the harness: its sync engine uses psycopg2 (Airflow 2's
# SQLAlchemy 1.4 needs it), and Airflow 3 derives an asyncpg URL from it for its async engine.
_PG2 = "psycopg2-binary>=2.9,<3"
_PG3 = (_PG2, "asyncpg>=0.29")

# The newest release of each supported minor series, and what each needs installed beside it.
AIRFLOW_PINS: dict[str, tuple[str, ...]] = {
    "3.3.2": _PG3,
    # fastapi 0.156.1 fails 3.2's API server at start ("Model 'TITerminalStatePayload' needs a
    # discriminator field"); 0.156.0 works.
    "3.2.2": (*_PG3, "fastapi<0.156.1"),
    "3.1.8": (*_PG3, _FERNET),
    # fastapi >= 0.132 answers 422 to PATCH /execution/task-instances/{id}/run (tasks never start);
    # PyJWT 2.11 refuses the token's `iss: None` ("Issuer (iss) must be a string").
    "3.0.6": (*_PG3, _FERNET, "fastapi<0.132", "pyjwt<2.11"),
    "2.11.2": (_PG2, _FERNET),
    "2.10.5": (_PG2, _FERNET),
}


class LockError(RuntimeError):
    """A lock is missing or no longer matches what it locks; the message says which command fixes it."""


def airflow_lock(version: str) -> Path:
    return LOCKS / f"airflow-{version}.txt"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def pins(lock: Path) -> dict[str, str]:
    """``{normalised name: version}`` of a lock's ``name==version`` lines."""
    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        if match:
            found[_normalise(match[1])] = match[2]
    return found


def airflow_requirements(version: str) -> Path:
    """The lock an Airflow venv is installed from (``pip install -r``), or a ``LockError`` naming the fix."""
    lock = airflow_lock(version)
    if not lock.exists():
        raise LockError(
            f"no lock for Airflow {version} ({lock.relative_to(REPO_ROOT)}); supported: "
            f"{', '.join(AIRFLOW_PINS)}. A new version: add it to harness/locks.py, then "
            f"`scripts/lock --airflow {version}`"
        )
    return lock


def check_installed(lock: Path = DEV_LOCK) -> list[str]:
    """How the running environment differs from ``lock`` (empty when it matches)."""
    installed = {_normalise(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    return _differences(pins(lock), installed)


def differs_from(lock: Path, venv: Path) -> list[str]:
    """How the venv at ``venv`` differs from ``lock`` (empty when it matches)."""
    out = subprocess.run(
        [str(venv / "bin/pip"), "freeze", "--all"], capture_output=True, text=True, check=True, env=_pip_env()
    ).stdout
    installed = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            installed[_normalise(name)] = version.strip()
    return _differences(pins(lock), installed)


def _differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    installed = {name: version for name, version in installed.items() if name != PROJECT}
    differences = [
        f"{name} {version} is installed, {locked[name]} locked"
        if name in locked
        else f"{name} {version} is installed but not locked"
        for name, version in sorted(installed.items())
        if locked.get(name) != version
    ]
    differences += [
        f"{name} {locked[name]} is locked but not installed" for name in sorted(set(locked) - set(installed))
    ]
    return differences


def refresh_dev(python: str = sys.executable) -> None:
    """Resolve ``.[dev]`` anew in a throwaway venv and write its freeze to ``locks/dev.txt``."""
    with tempfile.TemporaryDirectory(prefix="agentic-lock-") as tmp:
        pip = _venv(python, Path(tmp))
        _run([pip, "install", "-q", f"{REPO_ROOT}[dev]"])
        _write(DEV_LOCK, _freeze(pip), f"the project's venv ({PROJECT}[dev])", [f"{PROJECT}[dev]"])


def refresh_airflow(version: str, python: str = sys.executable) -> None:
    """Resolve Airflow ``version`` with its pins in a throwaway venv and write its lock."""
    if version not in AIRFLOW_PINS:
        raise LockError(f"Airflow {version} is not supported: add it and its pins to AIRFLOW_PINS first")
    asked = [f"apache-airflow=={version}", *AIRFLOW_PINS[version]]
    with tempfile.TemporaryDirectory(prefix="agentic-lock-") as tmp:
        pip = _venv(python, Path(tmp))
        _run([pip, "install", "-q", *asked])
        _write(airflow_lock(version), _freeze(pip), f"Airflow {version}", asked)


def _venv(python: str, where: Path) -> str:
    _run([python, "-m", "venv", str(where)])
    pip = str(where / "bin/pip")
    _run([pip, "install", "-q", "-U", "pip", "setuptools", "wheel"])
    return pip


def _freeze(pip: str) -> list[str]:
    out = subprocess.run(
        [pip, "freeze", "--all", "--exclude", PROJECT], capture_output=True, text=True, check=True
    ).stdout
    return sorted((line for line in out.splitlines() if line.strip()), key=str.lower)


def _write(lock: Path, lines: list[str], what: str, asked: Sequence[str]) -> None:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    header = [
        f"# Lock for {what}: refreshed {today} by scripts/lock, on CPython "
        f"{platform.python_version()} ({platform.system()} {platform.machine()}).",
        f"# Resolved from: {' '.join(asked)}",
        "# Edit harness/locks.py and run scripts/lock instead of editing this file.",
    ]
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("\n".join([*header, *lines]) + "\n")
    print(f"wrote {lock.relative_to(REPO_ROOT)} ({len(lines)} packages)", file=sys.stderr)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=_pip_env())
    if result.returncode != 0:
        raise LockError(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _pip_env() -> dict[str, str]:
    # A refresh resolves from the index alone: no constraints or config of the caller's leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", action="store_true", help="refresh locks/dev.txt")
    parser.add_argument("--airflow", nargs="*", metavar="VERSION", help="refresh these Airflows' locks")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when this environment differs from locks/dev.txt"
    )
    args = parser.parse_args(argv)
    if args.check:
        differences = check_installed()
        for line in differences:
            print(f"locks/dev.txt: {line}", file=sys.stderr)
        return 1 if differences else 0
    everything = not args.dev and args.airflow is None
    try:
        if args.dev or everything:
            refresh_dev()
        for version in args.airflow or (list(AIRFLOW_PINS) if everything or args.airflow == [] else []):
            refresh_airflow(version)
    except LockError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
