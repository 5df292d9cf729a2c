"""The service layer raises kinds of refusal; the HTTP layer answers each from one table."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from reconciler import errors
from reconciler.api.statuses import STATUSES, status_of
from reconciler.fleet.agent_state import DrainNotDelivered
from reconciler.fleet.call_back import CallBackFailed, OutOfScope

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent


def test_each_kind_has_its_status() -> None:
    expected = {
        errors.Invalid: 400,
        errors.Unauthenticated: 401,
        errors.Forbidden: 403,
        errors.NotFound: 404,
        errors.NoSuchJob: 404,
        errors.Conflict: 409,
        errors.NoRoomAtAll: 409,
        errors.Gone: 410,
        errors.Unverified: 422,
        errors.TooMany: 429,
        errors.AgentUnreachable: 502,
        errors.Unavailable: 503,
        errors.NoRoomForNow: 503,
    }
    assert {kind: status_of(kind("why")) for kind in expected} == expected
    assert status_of(OutOfScope("outside")) == 403
    assert status_of(CallBackFailed("vm", "http://x", "detail")) == 422
    assert status_of(DrainNotDelivered("unreachable")) == 502


def test_every_kind_the_module_defines_is_in_the_table() -> None:
    kinds = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.Refused) and cls not in (errors.Refused, errors.NoRoom)
    }
    assert all(status_of(kind("why")) != 500 for kind in kinds)
    assert {kind for kind, _ in STATUSES} <= kinds


def test_the_service_layer_names_no_http_status() -> None:
    """Statuses belong to reconciler/api: the core and the fleet raise kinds."""
    named = re.compile(r"\b(?:Refused|Invalid|Conflict|NotFound|Unavailable|Forbidden|Gone)\(\s*\d{3}\b")
    found = [
        str(path.relative_to(ROOT))
        for part in ("core", "fleet")
        for path in (ROOT / "reconciler" / part).rglob("*.py")
        if named.search(path.read_text(encoding="utf-8")) or "from aiohttp import web" in path.read_text()
    ]
    assert not found, found
