"""``python -m agent --config config/agent.toml``: run the agent until SIGTERM;
``python -m agent check-config --config ...``: check what it needs to start, then exit.

Exit codes: 0 after a graceful shutdown (or a check that passed), 1 when it cannot run (port taken,
home not writable), 2 for a bad configuration. Errors are one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from servicekit.extras import require

require("agent", "aiohttp", command="agentic-agent")  # before the imports that need it

from agent.config import AgentConfig, ConfigError, load_config  # noqa: E402
from agent.server import serve  # noqa: E402
from servicekit import logs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agentic-agent", description="Run and stop process trees on this VM."
    )
    parser.add_argument(
        "command", nargs="?", choices=["run", "check-config"], default="run", help="default: run"
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML file with an [agent] table")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "check-config":
            return check(config, args.config)
    except ConfigError as exc:
        print(f"agentic-agent: config error: {exc}", file=sys.stderr)
        return 2
    logs.setup("INFO", access_log=True)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # a TLS file that changed between loading the config and serving
        print(f"agentic-agent: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"agentic-agent: cannot run: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("agentic-agent: stopped at once by a second signal", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def check(config: AgentConfig, path: Path | None) -> int:
    """The configuration and its tokens load (else ConfigError: 2), the TLS files load (2), and the
    home can be created and written (1): what the agent needs before it listens."""
    config.server_ssl_context()
    try:
        (config.home / "jobs").mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=config.home):
            pass
    except OSError as exc:
        print(f"agentic-agent: home {config.home} is not writable: {exc.strerror or exc}", file=sys.stderr)
        return 1
    tokens = len(config.tokens)
    print(
        f"{path or 'defaults'}: ok (agent {config.id}, {config.scheme}://{config.host}:{config.port}, "
        f"home {config.home}, {tokens} token{'s' if tokens != 1 else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
