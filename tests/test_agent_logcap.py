"""A chatty job cannot fill its VM's disk: past ``max_log_bytes`` the middle of its output is dropped
(a hole punched in the file), the first and latest output stay readable, offsets stay valid, and the
job itself runs on untouched. The rule (fast), then a real agent and a real job."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

from agent.logcap import BLOCK, Dropped, next_hole
from harness.agent import AgentProcess
from harness.processes import wait_until

CAP = 64 * 1024


@pytest.mark.fast
def test_the_hole_keeps_half_the_cap_at_each_end_in_whole_blocks() -> None:
    assert next_hole(CAP, CAP, None) is None  # at the cap: nothing to drop
    hole = next_hole(1_000_000, CAP, None)
    assert hole == Dropped(CAP // 2, (1_000_000 - CAP // 2) // BLOCK * BLOCK)
    assert next_hole(1_000_000, CAP, hole) is None  # nothing new: less than a block since
    later = next_hole(2_000_000, CAP, hole)
    assert later is not None and later.start == hole.end and later.end % BLOCK == 0
    assert next_hole(10**9, 0, None) is None  # 0: no cap


def get(agent: AgentProcess, path: str, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {agent.token}"}
    return httpx.get(f"{agent.url}{path}", params=params, headers=headers, timeout=10)


def test_a_job_writing_far_past_the_cap_keeps_running_and_its_disk_use_stays_bounded(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "home", extra_config=f"max_log_bytes = {CAP}\n") as agent:
        command = "yes 'a line of output' | head -c 3000000; echo 'the last line'; sleep 600"
        answer = httpx.post(
            f"{agent.url}/run",
            json={"job_id": "chatty", "payload": {"command": command}},
            headers={"Authorization": f"Bearer {agent.token}"},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        log = tmp_path / "home" / "jobs" / "chatty" / "output.log"

        def capped() -> bool:
            st = log.stat()
            return st.st_size > 3_000_000 and st.st_blocks * 512 < 4 * CAP

        wait_until(capped, timeout=20, what="the output capped on disk")
        time.sleep(0.5)
        assert get(agent, "/jobs/chatty").json()["status"] == "RUNNING"  # never stopped for its output
        head = get(agent, "/jobs/chatty/log", offset=0, limit=64)
        assert head.content.startswith(b"a line of output\n")
        middle = get(agent, "/jobs/chatty/log", offset=1_000_000)
        said = rb"\[agent: output bytes (\d+)-(\d+) dropped: .*max_log_bytes=65536.*\]\n"
        note = re.fullmatch(said, middle.content)
        assert note is not None, middle.content[:200]
        assert int(middle.headers["X-Next-Offset"]) == int(note.group(2))  # the next read goes on after it
        size = int(middle.headers["X-Log-Size"])
        tail = get(agent, "/jobs/chatty/log", offset=size - 200).content
        assert b"the last line\n" in tail and b"\0" not in tail
        assert b"is dropped from its middle" in tail  # the agent said so in the output
        assert os.stat(log).st_size == size
