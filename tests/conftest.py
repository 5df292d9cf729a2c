"""Shared fixtures: router DBs on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from router_db import RouterDB

POSTGRES_ADMIN_URL = os.environ.get(
    "AGENTIC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped afterwards."""
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


@pytest.fixture(params=["sqlite", "postgresql"])
def router_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RouterDB]:
    """The router DB on each supported backend."""
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
