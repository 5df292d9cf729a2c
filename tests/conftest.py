"""Shared fixtures (router DBs on SQLite and on the real PostgreSQL server) and the test tiers.

Tiers, by marker (pyproject.toml declares them):
- ``fast``: no process, no real Airflow, no PostgreSQL; in-process servers on loopback are fine. A module
  declares ``pytestmark = pytest.mark.fast`` (or a test carries the mark). While a fast test's setup,
  call and teardown run, starting a process or connecting to PostgreSQL fails it: in ``-m fast`` the
  mark cannot lie (a full run leaves alone the teardown of a module where slower tests ran too).
- ``postgres``: applied here, at collection, to every test that uses the PostgreSQL server (see
  ``uses_postgres``): one that requests a ``postgres...`` fixture, a variant whose fixture or parameter
  value is ``"postgresql"`` (``router_db``'s, whose ``"sqlite"`` variant is fast), a real Airflow 2.
  ``postgres_url`` fails a test that reaches it without the mark.
- ``airflow``: starts a real Airflow (the modules mark themselves).
"""

from __future__ import annotations

import _posixsubprocess
import asyncio
import os
import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from sqlalchemy import create_engine, text

from harness.served import ServedAirflow
from router_db import RouterDB

POSTGRES_ADMIN_URL = os.environ.get(
    "AGENTIC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

# Every way this code base (and the libraries under it) starts a process or opens a PostgreSQL connection:
# asyncio's subprocesses and multiprocessing end in subprocess.Popen or _posixsubprocess.fork_exec.
GUARDED: list[tuple[object, str, str]] = [
    (subprocess.Popen, "__init__", "started a process (subprocess.Popen)"),
    (_posixsubprocess, "fork_exec", "started a process (fork_exec)"),
    (asyncio, "create_subprocess_exec", "started a process (asyncio.create_subprocess_exec)"),
    (asyncio, "create_subprocess_shell", "started a process (asyncio.create_subprocess_shell)"),
    (os, "fork", "forked (os.fork)"),
    (os, "forkpty", "forked (os.forkpty)"),
    (os, "posix_spawn", "started a process (os.posix_spawn)"),
    (os, "posix_spawnp", "started a process (os.posix_spawnp)"),
    (os, "system", "started a process (os.system)"),
    (psycopg, "connect", "connected to PostgreSQL (psycopg.connect)"),
    (psycopg.Connection, "connect", "connected to PostgreSQL (psycopg.Connection.connect)"),
    (psycopg.AsyncConnection, "connect", "connected to PostgreSQL (psycopg.AsyncConnection.connect)"),
]


def refusal(what: str, refused: list[str]) -> Callable[..., NoReturn]:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        shown = next((repr(a) for a in args if isinstance(a, str | bytes | list | tuple)), "")
        message = f"this fast test {what} {shown}".rstrip()
        refused.append(message)  # a refusal inside a thread or a broad except still fails the test
        pytest.fail(f"{message}: a fast test starts no process and uses no PostgreSQL", pytrace=False)

    return refuse


# Nodes (the session, folders, modules) holding a selected test that is not fast: see pytest_runtest_teardown.
HOLD_SLOW_TESTS = pytest.StashKey[frozenset[str]]()


@contextmanager
def fast_guard(item: pytest.Item, *, guard: bool = True) -> Generator[None]:
    """Refuse processes and PostgreSQL to a ``fast`` test, for one phase (module-scoped fixtures start in
    their first test's setup and end in the last one's teardown: phases, not a fixture, cover them)."""
    if item.get_closest_marker("fast") is None or not guard:
        yield
        return
    refused: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for target, name, what in GUARDED:
            patch.setattr(target, name, refusal(what, refused))
        yield
    if refused:
        pytest.fail("; ".join(refused), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None]:
    with fast_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    with fast_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    # The last test of a module also ends the module's fixtures. Where a test that is not fast ran in
    # it, those may hold processes set up unguarded, which they end here: left alone. A run of the
    # fast tier alone (-m fast) has no such module, and guards every teardown.
    ending = [node for node in item.listchain()[:-1] if nextitem is None or node not in nextitem.listchain()]
    slow_scopes = item.config.stash.get(HOLD_SLOW_TESTS, frozenset())
    with fast_guard(item, guard=not any(node.nodeid in slow_scopes for node in ending)):
        return (yield)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[HOLD_SLOW_TESTS] = frozenset(
        node.nodeid
        for item in session.items
        if item.get_closest_marker("fast") is None
        for node in item.listchain()[:-1]
    )


def uses_postgres(item: pytest.Item) -> bool:
    """A fixture named ``postgres...`` (``postgres_url``, a module's server-backed stand), a variant
    ``"postgresql"``, or a real Airflow 2 (its metadata lives on the server: harness/airflow.py)."""
    callspec = getattr(item, "callspec", None)
    variant = list(callspec.params.values()) if callspec is not None else []
    return (
        any(name.startswith("postgres") for name in getattr(item, "fixturenames", ()))
        or "postgresql" in variant
        or (item.get_closest_marker("airflow") is not None and any(map(is_airflow_2, variant)))
    )


def is_airflow_2(value: object) -> bool:
    """A full Airflow 2 version as a test's variant (2.11.2 in CI, 2.10.5 by AGENTIC_AIRFLOW_VERSIONS)."""
    return isinstance(value, str) and re.fullmatch(r"2\.\d+\.\d+", value) is not None


@pytest.hookimpl(tryfirst=True)  # before -m deselects: "not postgres" sees the marks added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if uses_postgres(item):
            item.add_marker(pytest.mark.postgres)
    give_unique_ids(items)
    clashes = [
        item.nodeid
        for item in items
        if item.get_closest_marker("fast")
        and (item.get_closest_marker("postgres") or item.get_closest_marker("airflow"))
    ]
    if clashes:
        raise pytest.UsageError(
            "marked fast but uses PostgreSQL or Airflow (router_db's SQLite variant is fast by itself):\n  "
            + "\n  ".join(clashes)
        )


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped afterwards."""
    if request.node.get_closest_marker("postgres") is None:
        pytest.fail(
            "uses PostgreSQL but is not marked postgres: request postgres_url as an argument, or name"
            ' the variant that reaches it "postgresql" (see uses_postgres)'
        )
    name = f"agentic_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is required for this test: {exc}")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[RouterDB]:
    """A router DB on SQLite, in the test's own directory."""
    router = RouterDB(f"sqlite:///{tmp_path / 'router.db'}")
    router.create_schema()
    yield router
    router.dispose()


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.fast), "postgresql"])
def router_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RouterDB]:
    """The router DB on each supported backend. The SQLite variant is in the fast tier (a test using this
    fixture starts no process: the guard checks), the PostgreSQL one in the postgres tier."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'router.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    db = RouterDB(url)
    db.create_schema()
    try:
        yield db
    finally:
        db.dispose()


def give_unique_ids(items: list[pytest.Item]) -> None:
    """One node id per test. Schemathesis names each operation's test ``test[GET /jobs]`` but leaves
    them all one node id, and pytest-xdist schedules by node id: two workers ran one operation of
    each document and reported nothing of the others. Any other duplicate stops the run."""
    for item in items:
        if item.name != item.nodeid.rsplit("::", 1)[-1] and item.parent is not None:
            unique = f"{item.parent.nodeid}::{item.name}"
            if hasattr(item, "_id"):  # pytest 9.2 keeps a structured id
                item._id = type(item._id).parse(unique)
            else:
                item._nodeid = unique
    seen = Counter(item.nodeid for item in items)
    duplicates = sorted(nodeid for nodeid, count in seen.items() if count > 1)
    if duplicates:
        listed = "\n  ".join(duplicates)
        raise pytest.UsageError(f"tests sharing a node id (a worker would run one of them):\n  {listed}")


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    """The Airflow REST stand-in on a loopback port, for one test (a module may define its own)."""
    served = ServedAirflow()
    served.start()
    try:
        yield served
    finally:
        served.stop()
