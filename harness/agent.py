"""Run a real agent process on loopback: ``python -m agent --config <tmp toml>``.

    with AgentProcess(tmp_path / "agent") as agent:
        ...  # agent.url, agent.token, agent.home, agent.pid

``stop()`` ends the agent and everything it started (its job supervisors and their jobs), by PID.
``kill()`` SIGKILLs only the agent's own PID and leaves its jobs running, as a crash would; a new
``AgentProcess`` on the same ``home`` then adopts them.

Tokens: the agent accepts ``accepted_tokens`` (default: just ``token``), passed in its environment;
with ``token_file`` it reads its tokens from that file instead. ``token`` is what tests send.
HTTPS: pass ``tls_cert_file`` and ``tls_key_file``, and ``ca_file`` (the CA that signed the
certificate) so that the harness can tell when the agent is up.
Capacity and drain: ``max_jobs`` and ``drain_on_shutdown_seconds`` are the agent's keys (default 0,
as the agent's); ``terminate()`` sends the SIGTERM of a planned shutdown.
``command_prefix`` runs the agent under a wrapper that ends by exec'ing it (``unshare ... exec "$@"``),
so the agent keeps the wrapper's PID and ``kill()`` and ``stop()`` still reach it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from agent.identity import IDENTITY_FILE, Identity
from agent_api.client import AgentClient
from harness.processes import free_port, start, stop_tree

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    def __init__(
        self,
        home: Path,
        *,
        token: str = "test-agent-token",
        agent_id: str = "test-agent",
        port: int | None = None,
        grace_seconds: float = 0.5,
        poll_seconds: float = 0.1,
        max_body_bytes: int = 1024 * 1024,
        max_jobs: int = 0,
        drain_on_shutdown_seconds: float = 0.0,
        ready_timeout: float = 20.0,
        accepted_tokens: Sequence[str] | None = None,
        token_file: Path | None = None,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        ca_file: Path | None = None,
        command_prefix: Sequence[str] = (),
        extra_config: str = "",
        extra_env: Mapping[str, str] | None = None,
        allow_root_jobs: bool = True,  # the tests run as root: their jobs run without run_as
    ) -> None:
        self.home = home
        self.allow_root_jobs = allow_root_jobs
        self.extra_env = dict(extra_env or {})  # e.g. ROUTER_URL and AGENTIC_FLEET_TOKEN to register
        self.token = token
        self.accepted_tokens = list(accepted_tokens) if accepted_tokens is not None else [token]
        self.token_file = token_file
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self.ca_file = ca_file
        self.command_prefix = list(command_prefix)
        self.extra_config = extra_config  # more [agent] keys, as TOML lines
        self.agent_id = agent_id
        self.port = port if port is not None else free_port()
        self.grace_seconds = grace_seconds
        self.poll_seconds = poll_seconds
        self.max_body_bytes = max_body_bytes
        self.max_jobs = max_jobs
        self.drain_on_shutdown_seconds = drain_on_shutdown_seconds
        self.ready_timeout = ready_timeout
        self.config_path = home.parent / f"{home.name}-agent.toml"
        self.log_path = home.parent / f"{home.name}-agent.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert_file is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the agent is not started")
        return self._proc.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the agent is not started")
        return self._proc

    def start(self) -> AgentProcess:
        """Start the agent and wait until /health answers (that is, until adoption is done)."""
        if self._proc is not None:
            raise RuntimeError("the agent is already started")
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "[agent]\n"
            f"id = {json.dumps(self.agent_id)}\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"home = {json.dumps(str(self.home))}\n"
            f"grace_seconds = {self.grace_seconds}\n"
            f"poll_seconds = {self.poll_seconds}\n"
            f"max_body_bytes = {self.max_body_bytes}\n"
            f"max_jobs = {self.max_jobs}\n"
            f"drain_on_shutdown_seconds = {self.drain_on_shutdown_seconds}\n"
            f"allow_root_jobs = {'true' if self.allow_root_jobs else 'false'}\n"
            + "".join(
                f"{key} = {json.dumps(str(path))}\n"
                for key, path in (
                    ("token_file", self.token_file),
                    ("tls_cert_file", self.tls_cert_file),
                    ("tls_key_file", self.tls_key_file),
                )
                if path is not None
            )
            + self.extra_config,
            encoding="utf-8",
        )
        env = {key: value for key, value in os.environ.items() if not key.startswith("AGENTIC_AGENT_")}
        if self.token_file is None:
            env["AGENTIC_AGENT_TOKEN"] = ",".join(self.accepted_tokens)
        env.update(self.extra_env)
        self._proc = start(
            [*self.command_prefix, sys.executable, "-m", "agent", "--config", str(self.config_path)],
            log_path=self.log_path,
            env=env,
            cwd=REPO_ROOT,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        """Poll /health until it answers 200; fail early if the agent exits meanwhile."""
        proc = self.process
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file is not None else None
        deadline = time.monotonic() + self.ready_timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_text()[-2000:]
                raise RuntimeError(f"the agent exited with {proc.returncode} before it was up:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2, context=context) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise TimeoutError(f"{self.url}/health not healthy after {self.ready_timeout:g} s: {last_error}")

    def stop(self) -> None:
        """Stop the agent and every process it started (supervisors and jobs alike)."""
        if self._proc is not None:
            stop_tree(self._proc, grace=5.0)
            self._proc = None

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM only the agent (a graceful shutdown that leaves jobs running); its exit code."""
        proc = self.process
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=timeout)
        self._proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL only the agent's own PID, as a crash would; its jobs keep running."""
        proc = self.process
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None

    def call_token(self) -> str:
        """What the sidecar presents to this agent once it registered: derived from its home's
        identity (made at its start), which a test reads to call the agent as the sidecar does."""
        return self._identity().call_token(self.agent_id)

    def credential(self) -> str:
        """The agent's credential (its identity proof) as its home holds it now."""
        return self._identity().proof(self.agent_id)

    def _identity(self) -> Identity:
        secret = bytes.fromhex((self.home / IDENTITY_FILE).read_text(encoding="ascii").strip())
        return Identity(secret, ())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def with_client(agent: AgentProcess, scenario: Callable[[AgentClient], Awaitable[T]]) -> T:
    """Run ``scenario`` with a client of ``agent`` (its token) in a fresh event loop."""

    async def main() -> T:
        async with AgentClient(agent.url, agent.token) as client:
            return await scenario(client)

    return asyncio.run(main())


def new_id() -> str:
    """A job id no test used before."""
    return f"job-{uuid.uuid4().hex[:12]}"
