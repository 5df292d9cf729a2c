"""A real headless Chromium, driven over the DevTools protocol (a websocket, with aiohttp), for tests
of the sidecar's pages.

    async with chromium(tmp_path / "chromium") as page:
        await page.navigate(f"{sidecar.url}/ui/jobs")
        await page.fill_and_submit("token", viewer_token)
        text = await page.text()

Chromium is Debian's package (``scripts/ensure-tools`` installs it). It starts on about:blank with a
profile of its own and ``--remote-debugging-port=0``: the port it chose is read from the
``DevToolsActivePort`` file it writes in that profile. Every wait is bounded, and the browser is
stopped by its PID (with its children) at the end.

    python -m harness.browser screenshot <url> <file.png>

saves a screenshot of ``url``, logging in first with ``$AGENTIC_VIEWER_TOKEN`` if the page asks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from harness.processes import start, stop_tree

EXECUTABLE = "chromium"
START_TIMEOUT = 20.0  # seconds for Chromium to write DevToolsActivePort
CALL_TIMEOUT = 10.0  # one DevTools command
LOAD_TIMEOUT = 10.0  # one page load
WINDOW = (1200, 860)


class DevToolsError(Exception):
    """Chromium answered a command with an error, or did not answer in time."""


class Page:
    """One tab, reached through its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                call = self._calls.pop(data["id"], None)
                if call is not None and not call.done():
                    call.set_result(data)
                continue
            for name, waiter in list(self._waiters):
                if name == data.get("method") and not waiter.done():
                    waiter.set_result(data.get("params", {}))
                    self._waiters.remove((name, waiter))
        for call in self._calls.values():  # the socket closed: nobody answers any more
            if not call.done():
                call.set_exception(DevToolsError("the DevTools connection closed"))

    async def send(self, method: str, timeout: float = CALL_TIMEOUT, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        answer = self._calls[number] = asyncio.get_running_loop().create_future()
        await self._ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
        try:
            data = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            self._calls.pop(number, None)
            raise DevToolsError(f"{method}: no answer within {timeout:g} s") from None
        if "error" in data:
            raise DevToolsError(f"{method}: {data['error'].get('message', data['error'])}")
        result: dict[str, Any] = data.get("result", {})
        return result

    def expect(self, event: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``event``: ask before the action that causes it."""
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((event, waiter))
        return waiter

    async def _loaded(self, waiter: asyncio.Future[dict[str, Any]], what: str) -> None:
        try:
            await asyncio.wait_for(waiter, LOAD_TIMEOUT)
        except TimeoutError:
            raise DevToolsError(f"{what}: the page did not load within {LOAD_TIMEOUT:g} s") from None

    async def navigate(self, url: str) -> None:
        """Go to ``url`` and wait for its load event (after any redirect)."""
        loaded = self.expect("Page.loadEventFired")
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise DevToolsError(f"navigate {url}: {result['errorText']}")
        await self._loaded(loaded, f"navigate {url}")

    async def evaluate(self, expression: str) -> Any:
        """``expression``'s value in the page (DevTools' own evaluation: the page's CSP allows no
        script of its own)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"evaluate: {result['exceptionDetails'].get('text', 'exception')}")
        return result["result"].get("value")

    async def fill_and_submit(self, field: str, value: str) -> None:
        """Type ``value`` into the form field named ``field`` and click its form's submit button, as a
        person would; wait for the page that answers."""
        await self._act(
            f"const input = document.querySelector({json.dumps(f'[name={field!r}]')});"
            f"if (!input) return false; input.value = {json.dumps(value)};"
            "input.form.querySelector('[type=submit]').click(); return true;",
            f"field {field!r}",
        )

    async def click(self, label: str) -> None:
        """Click the button or link whose text is ``label``; wait for the page that answers."""
        await self._act(
            "const found = [...document.querySelectorAll('button, a')]"
            f".find(e => e.textContent.trim() === {json.dumps(label)});"
            "if (!found) return false; found.click(); return true;",
            f"button or link {label!r}",
        )

    async def _act(self, body: str, what: str) -> None:
        loaded = self.expect("Page.loadEventFired")
        if not await self.evaluate(f"(() => {{ {body} }})()"):
            raise DevToolsError(f"no {what} on the page")
        await self._loaded(loaded, what)

    async def text(self) -> str:
        return str(await self.evaluate("document.body ? document.body.innerText : ''"))

    async def url(self) -> str:
        return str(await self.evaluate("location.href"))

    async def wait_text(self, predicate: Callable[[str], bool], *, timeout: float, what: str) -> str:
        """The page's text once ``predicate`` holds, reading it again while the page reloads itself."""
        deadline = time.monotonic() + timeout
        text = ""
        while True:
            with contextlib.suppress(DevToolsError):  # a reload under way: no document to read yet
                text = await self.text()
                if predicate(text):
                    return text
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: not seen within {timeout:g} s; the page says:\n{text}")
            await asyncio.sleep(0.2)

    async def cookies(self) -> list[dict[str, Any]]:
        cookies: list[dict[str, Any]] = (await self.send("Network.getCookies"))["cookies"]
        return cookies

    async def screenshot(self) -> bytes:
        """The page as shown, as PNG."""
        return base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def chromium(workdir: Path | None = None) -> AsyncIterator[Page]:
    """Chromium started in ``workdir`` (a temporary directory, removed after, if None), as its one
    tab; stopped by its PID, with its children, when the block ends."""
    executable = shutil.which(EXECUTABLE)
    if executable is None:
        raise RuntimeError("chromium is not installed: run scripts/ensure-tools")
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="chromium-")) if workdir is None else workdir
    profile = workdir / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    proc = start(
        [
            executable,
            "--headless=new",
            "--no-sandbox",  # containers and CI run as root, where the sandbox cannot start
            "--disable-gpu",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-extensions",
            "about:blank",
        ],
        log_path=workdir / "chromium.log",
    )
    try:
        async with aiohttp.ClientSession() as session:
            port = await _devtools_port(profile, proc)
            page_url = await _page_socket(session, port)
            ws = await session.ws_connect(page_url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout())
            page = Page(ws)
            try:
                await page.send("Page.enable")
                await page.send("Network.enable")
                yield page
            finally:
                await page.close()
    finally:
        await asyncio.to_thread(stop_tree, proc, grace=5.0)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


async def _devtools_port(profile: Path, proc: subprocess.Popen[bytes]) -> int:
    """The port Chromium chose, from the first line of ``DevToolsActivePort`` (written once it listens)."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before it listened")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        await asyncio.sleep(0.05)
    raise TimeoutError(f"chromium wrote no {marker.name} within {START_TIMEOUT:g} s")


async def _page_socket(session: aiohttp.ClientSession, port: int) -> str:
    """The websocket of the tab that shows about:blank."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    async with session.get(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
        targets = await response.json()
    for target in targets:
        if target.get("type") == "page":
            return str(target["webSocketDebuggerUrl"])
    raise DevToolsError("chromium shows no page")


async def _screenshot(url: str, out: Path, token: str) -> None:
    async with chromium() as page:
        await page.navigate(url)
        if "/ui/login" in await page.url():
            if not token:
                raise SystemExit("the page asks for a login: set AGENTIC_VIEWER_TOKEN")
            await page.fill_and_submit("token", token)
        await asyncio.to_thread(out.write_bytes, await page.screenshot())


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "screenshot":
        print("usage: python -m harness.browser screenshot <url> <file.png>", file=sys.stderr)
        return 2
    asyncio.run(_screenshot(argv[1], Path(argv[2]), os.environ.get("AGENTIC_VIEWER_TOKEN", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
