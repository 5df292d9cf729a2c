"""A secret read from a file follows the file, keeps its last good value through a bad moment, and
never shows up in a log; token auth and the agent pool use the value of the moment."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from harness.wiring import said_of
from reconciler.config import AgentEntry
from reconciler.fleet.agents import AgentPool, WrongAgent
from servicekit.credentials import Secret, follow, load_secret, load_tokens, token_list
from servicekit.http import token_auth

pytestmark = pytest.mark.fast

OLD, NEW = "old-tok-5b1c9e", "new-tok-8d2f4a"


def tokens_in(path: Path, text: str) -> Secret[tuple[str, ...]]:
    path.write_text(text, encoding="utf-8")
    return load_tokens("[agent] token", env_name="UNSET", file=path, env={})


def test_a_changed_file_is_read_again_and_an_unchanged_one_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "tokens"
    secret = tokens_in(path, OLD)
    assert secret.refresh() is False and secret.current() == (OLD,)
    path.write_text(f"{OLD}\n{NEW}\n", encoding="utf-8")
    assert secret.refresh() is True and secret.current() == (OLD, NEW)
    assert secret.refresh() is False
    assert [r.getMessage() for r in caplog.records] == [f"[agent] token: reloaded from {path}"]


def test_a_kubernetes_secret_update_is_seen_through_its_links(tmp_path: Path) -> None:
    # <dir>/token -> ..data/token, ..data -> ..v1: an update swaps ..data to ..v2 in one rename.
    for version, text in (("..v1", OLD), ("..v2", NEW)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "token").write_text(text, encoding="utf-8")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "token").symlink_to(Path("..data") / "token")
    secret = load_secret("agent 'a' token", env_name="UNSET", file=tmp_path / "token", env={})
    assert secret.current() == OLD
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert secret.refresh() is True and secret.current() == NEW


@pytest.mark.parametrize("bad", ["missing", "empty", "only separators", "not UTF-8", "a directory"])
def test_a_file_unusable_mid_rotation_keeps_the_last_good_tokens_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    path = tmp_path / "tokens"
    secret = tokens_in(path, f"{OLD}\n")
    path.unlink()
    if bad == "empty":
        path.write_text("", encoding="utf-8")
    elif bad == "only separators":
        path.write_text(" ,\n", encoding="utf-8")
    elif bad == "not UTF-8":
        path.write_bytes(b"\xff\xfe" + NEW.encode())
    elif bad == "a directory":
        path.mkdir()
    caplog.set_level(logging.INFO)
    assert (secret.refresh(), secret.refresh(force=True), secret.current()) == (False, False, (OLD,))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping the last good value" in warnings[0].getMessage()
    if path.is_dir():
        path.rmdir()
    path.write_text(NEW, encoding="utf-8")
    assert secret.refresh() is True and secret.current() == (NEW,)
    assert not any(token in r.getMessage() for r in caplog.records for token in (OLD, NEW))


def test_follow_reads_changed_files_by_itself_and_at_once_on_sighup(tmp_path: Path) -> None:
    polled = tokens_in(tmp_path / "polled", OLD)
    forced = tokens_in(tmp_path / "forced", OLD)

    async def until_new(secret: Secret[tuple[str, ...]]) -> tuple[str, ...]:
        for _ in range(150):
            if secret.current() == (NEW,):
                break
            await asyncio.sleep(0.02)
        return secret.current()

    async def following(secret: Secret[tuple[str, ...]], *, period: float, hangup: bool) -> tuple[str, ...]:
        task = asyncio.create_task(follow([secret], period=period))
        try:
            await asyncio.sleep(0.1)
            assert secret.file is not None
            secret.file.write_text(NEW, encoding="utf-8")
            if hangup:
                assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None), "no SIGHUP handler"
                os.kill(os.getpid(), signal.SIGHUP)
            return await until_new(secret)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def scenario() -> tuple[tuple[str, ...], tuple[str, ...]]:
        by_itself = await following(polled, period=0.05, hangup=False)
        # Looked at once an hour: only SIGHUP can make it read the file within the test.
        on_sighup = await following(forced, period=3600, hangup=True)
        return by_itself, on_sighup

    assert asyncio.run(scenario()) == ((NEW,), (NEW,))
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # handed back when following stops


def test_token_auth_asks_for_the_tokens_at_each_request(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    secret = tokens_in(path, OLD)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def scenario() -> list[int]:
        app = web.Application(middlewares=[token_auth(secret, open_paths=())])
        app.router.add_get("/x", ok)
        statuses = []
        async with TestClient(TestServer(app)) as client:
            for step in ("before", "after"):
                if step == "after":
                    path.write_text(NEW, encoding="utf-8")
                    secret.refresh()
                for token in (OLD, NEW):
                    response = await client.get("/x", headers={"Authorization": f"Bearer {token}"})
                    statuses.append(response.status)
        return statuses

    assert asyncio.run(scenario()) == [200, 401, 401, 200]


def test_the_pool_sends_the_current_token_and_nothing_to_a_refused_agent(tmp_path: Path) -> None:
    path = tmp_path / "agent-token"
    path.write_text(OLD, encoding="utf-8")
    secret = Secret(OLD, what="agent 'a' token", file=path, parse=lambda text: token_list(text)[0])

    async def scenario() -> None:
        pool = AgentPool([AgentEntry("a", "http://127.0.0.1:1")], {"a": secret}, timeout=1, stop_timeout=1)
        try:
            before = pool.client("a")
            assert pool.client("a") is before  # one client while the token stays
            path.write_text(NEW, encoding="utf-8")
            secret.refresh()
            after = pool.client("a")
            assert after is not before and after._token == NEW
            said_of(pool).refuse = lambda agent_id: "the agent at http://127.0.0.1:1 says it is 'b', not 'a'"
            with pytest.raises(WrongAgent, match="says it is 'b'"):
                pool.client("a")
            assert pool.prober("a")._token == NEW  # health checks go on: how the right agent is found
        finally:
            await pool.close()

    asyncio.run(scenario())
