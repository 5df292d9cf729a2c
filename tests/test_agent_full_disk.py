"""A home that refuses writes (full, or remounted read-only) never keeps a job running.

The stop's intent and the job's end are written to the job's directory; when that write fails, the
stop goes on (SIGTERM, grace, SIGKILL) with the record held in memory. In process, with the agent's
real job manager and a real process tree, the directory's writes failing with ENOSPC from the stop on.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.jobs import JobManager
from agent.state import JobDir
from agent_api.protocol import parse_run_request
from harness.processes import alive, process_group, wait_until


def test_a_stop_goes_on_when_the_home_refuses_to_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = {
        "AGENTIC_AGENT_TOKEN": "t",
        "AGENTIC_AGENT_HOME": str(tmp_path),
        "AGENTIC_AGENT_ALLOW_ROOT_JOBS": "true",
        "AGENTIC_AGENT_GRACE_SECONDS": "0.5",
    }
    config = load_config(None, environ=environ)

    async def main() -> None:
        jobs = JobManager(config)
        await jobs.load()
        jobs.start_monitor()
        try:
            info = await jobs.run(
                parse_run_request({"job_id": "j-full", "payload": {"command": "sleep 300"}})
            )
            assert info.pid is not None
            tree = process_group(info.pid)
            assert tree

            def refuse(self: Any, record: Any, *, durable: bool = True) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(JobDir, "write_state", refuse)
            result = await jobs.stop("j-full", force=False, reason="the task was marked failed")
            assert result.ok and result.action.value in ("terminated", "killed"), result
            await asyncio.to_thread(wait_until, lambda: not alive(tree), timeout=10, what="the tree gone")
            assert jobs.get("j-full").status.value == "FAILED"
        finally:
            await jobs.close()

    asyncio.run(main())
