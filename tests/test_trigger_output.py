"""The job's output in the task's log while it runs: by offset, whole lines, bounded per poll, and
neither lost nor repeated when another trigger takes over.

First the poller against a scripted sidecar (no real waiting), then the whole path with real
processes: the trigger's reads go through the real sidecar to the real agent, whose job directory
keeps how far the task's log got, across a restart of the agent and a trigger started afresh from the
offset it was deferred with. Airflow's own reading of the task's log is in tests/test_airflow_e2e.py.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentic_airflow.polling import OUTPUT_BEHIND_CHUNKS, JobPoller, output_to_show
from agentic_airflow.sidecar_client import SidecarEndpoint
from harness.agent import AgentProcess
from harness.processes import free_port
from harness.recording_log import RecordingLog
from harness.sidecar import AgentRef, SidecarProcess

JOB = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"
BASE = "http://sidecar.test:8790"
CONN = "agentic_run_default"


# --- which part of a chunk is shown -----------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("data", "full_chunk", "final", "shown"),
    [
        (b"one\ntwo\nthr", False, False, b"one\ntwo\n"),  # "thr" waits for the rest of its line
        (b"one\ntwo\nthr", False, True, b"one\ntwo\nthr"),  # the job ended: nothing more will come
        (b"no newline yet", False, False, b""),
        (b"a very long line", True, False, b"a very long line"),  # a whole chunk without a newline
        (b"one\ntw", True, False, b"one\n"),
        (b"", False, False, b""),
        # A long line cut inside a character: the character waits for the next read, whole.
        ("ab€".encode()[:-1], True, False, b"ab"),
        ("ab€".encode(), True, False, "ab€".encode()),
        ("a😀".encode()[:-2], True, False, b"a"),
        (b"\xff\xfe", True, False, b"\xff\xfe"),  # not UTF-8: shown as it is
    ],
)
def test_whole_lines_are_shown_and_a_partial_one_waits(
    data: bytes, full_chunk: bool, final: bool, shown: bytes
) -> None:
    assert output_to_show(data, full_chunk=full_chunk, final=final) == shown


# --- the poller against a scripted sidecar -----------------------------------------------------------


class Sidecar:
    """A job whose status and output follow a script: each poll of ``GET /jobs/{JOB}`` takes the next
    (status, output so far); the log answers as the agent does, ``cursor`` included."""

    def __init__(self, *script: tuple[str, bytes], fail_log_reads: int = 0) -> None:
        self.script = list(script)
        self.output = b""
        self.mark = 0
        self.log_requests: list[dict[str, str]] = []
        self.fail_log_reads = fail_log_reads

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/jobs/{JOB}/log":
            params = dict(request.url.params)
            self.log_requests.append(params)
            if self.fail_log_reads:
                self.fail_log_reads -= 1
                return httpx.Response(502, json={"error": "agent agent-1 communication failed: timeout"})
            start = int(params["offset"])
            if params.get("cursor") == "true":
                start = max(start, self.mark)
                self.mark = min(start, len(self.output))
            data = self.output[start : start + int(params.get("limit", 1 << 22))]
            headers = {"X-Log-Size": str(len(self.output)), "X-Next-Offset": str(start + len(data))}
            return httpx.Response(200, content=data, headers=headers)
        status, self.output = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return httpx.Response(200, json={"job_id": JOB, "status": status, "rc": 0, "agent_id": "agent-1"})


async def endpoint(conn_id: str) -> SidecarEndpoint:
    return SidecarEndpoint(BASE, "token")


def poller(sidecar: Sidecar, log: RecordingLog, **options: Any) -> JobPoller:
    async def no_wait(seconds: float) -> None:
        await asyncio.sleep(0)

    return JobPoller(
        job_id=JOB,
        conn_id=CONN,
        resolve=endpoint,
        log=log,
        poll_interval=1.0,
        sleep=no_wait,
        rng=random.Random(1),
        transport=httpx.MockTransport(sidecar),
        **options,
    )


def shown_lines(log: RecordingLog) -> list[str]:
    """The output lines in the log (one record per read, lines within it)."""
    return [line for record in log.at("info") if not record.startswith("job ") for line in record.split("\n")]


@pytest.mark.fast
def test_output_is_shown_as_it_grows_line_by_line_and_drained_at_the_end() -> None:
    sidecar = Sidecar(
        ("RUNNING", b""),
        ("RUNNING", b"step 1\nstep"),
        ("RUNNING", b"step 1\nstep 2\n"),
        ("SUCCEEDED", b"step 1\nstep 2\nno newline at the end"),
    )
    log = RecordingLog()
    the_poller = poller(sidecar, log)
    event = asyncio.run(the_poller.run())
    assert event["status"] == "SUCCEEDED"
    assert shown_lines(log) == ["step 1", "step 2", "no newline at the end"]
    assert the_poller.log_offset == len(b"step 1\nstep 2\nno newline at the end")
    # Every read names where the task's log has got to, and asks as the task's log (cursor).
    assert [r["offset"] for r in sidecar.log_requests] == ["0", "0", "7", "14"]
    assert all(r["cursor"] == "true" and r["limit"] == "65536" for r in sidecar.log_requests)


@pytest.mark.fast
def test_a_cancelled_trigger_tells_how_far_it_showed_the_output() -> None:
    sidecar = Sidecar(("RUNNING", b"one\ntwo\n"))
    log = RecordingLog()
    the_poller = poller(sidecar, log)

    async def cancel_after_a_few_polls() -> None:
        task = asyncio.create_task(the_poller.run())
        while len(sidecar.log_requests) < 3:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_a_few_polls())
    assert shown_lines(log) == ["one", "two"]
    # The last request says 8 bytes were shown, so a new trigger starts there.
    assert sidecar.log_requests[-1]["offset"] == "8" and sidecar.mark == 8


@pytest.mark.fast
def test_output_beyond_what_a_poll_may_show_is_skipped_with_a_note() -> None:
    chunk = 16
    lines = b"".join(b"line %03d\n" % i for i in range(40))  # 360 bytes: far more than 4 chunks of 16
    sidecar = Sidecar(("RUNNING", lines), ("SUCCEEDED", lines))
    log = RecordingLog()
    the_poller = poller(sidecar, log, output_chunk_bytes=chunk)
    asyncio.run(the_poller.run())
    (note,) = log.at("warning")
    assert re.search(rf"job {JOB}: \d+ bytes of output not shown here; the whole output: GET /jobs/", note)
    shown = shown_lines(log)
    assert shown[0] == "line 000"  # the first poll's chunk
    assert shown[1:] == ["line 039"]  # after the skip: whole lines only, the job's last words
    assert len(shown) <= 2 + 2 * (OUTPUT_BEHIND_CHUNKS + 1)  # bounded, not the whole output


@pytest.mark.fast
def test_a_failing_log_read_is_reported_once_and_the_poll_goes_on() -> None:
    sidecar = Sidecar(
        ("RUNNING", b"a\n"),
        ("RUNNING", b"a\n"),
        ("RUNNING", b"a\nb\n"),
        ("FAILED", b"a\nb\n"),
        fail_log_reads=2,
    )
    log = RecordingLog()
    event = asyncio.run(poller(sidecar, log).run())
    assert event["status"] == "FAILED"
    assert shown_lines(log)[:2] == ["a", "b"]  # caught up once reads work again
    (warning,) = log.at("warning")  # two failures, one line
    assert warning == (
        f"job {JOB}: cannot read the job's output (HTTP 502); the task's log shows it once a read works"
    )


@pytest.mark.fast
def test_an_answer_whose_offsets_do_not_add_up_shows_nothing() -> None:
    class Lying(Sidecar):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            answer = super().__call__(request)
            if request.url.path.endswith("/log"):
                answer.headers["X-Next-Offset"] = "-5"
            return answer

    sidecar = Lying(("RUNNING", b"a\n"), ("FAILED", b"a\n"))
    log = RecordingLog()
    the_poller = poller(sidecar, log)
    assert asyncio.run(the_poller.run())["status"] == "FAILED"
    assert shown_lines(log) == [] and the_poller.log_offset == 0
    assert "cannot read the job's output" in log.at("warning")[0]


@pytest.mark.fast
def test_without_streaming_the_log_is_read_only_for_the_failure_tail() -> None:
    sidecar = Sidecar(("RUNNING", b"a\n"), ("FAILED", b"a\nb\n"))
    log = RecordingLog()
    event = asyncio.run(poller(sidecar, log, log_offset=None).run())
    assert event["status"] == "FAILED" and shown_lines(log) == []
    assert all("cursor" not in r for r in sidecar.log_requests)


# --- real sidecar, real agent -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SidecarProcess, AgentProcess]]:
    base = tmp_path_factory.mktemp("output")
    with (
        AgentProcess(home=base / "agent", agent_id="agent-1") as agent,
        SidecarProcess(
            workdir=base / "sidecar",
            airflow_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: the loop stops nothing
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
        ) as sidecar,
    ):
        yield sidecar, agent


def submit(sidecar: SidecarProcess, command: str) -> str:
    body = {
        "command": command,
        "labels": ["default"],
        "dag_id": "output",
        "task_id": f"t{time.monotonic_ns()}",
        "run_id": "manual__1",
        "map_index": -1,
        "try_number": 1,
    }
    with sidecar.client() as client:
        answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def test_a_new_trigger_after_an_agent_restart_neither_repeats_nor_loses_a_line(
    stack: tuple[SidecarProcess, AgentProcess], tmp_path: Path
) -> None:
    sidecar, agent = stack
    gate = tmp_path / "go-on"
    command = (
        'for i in $(seq 1 5); do echo "line $i"; done; '
        f"while [ ! -e {gate} ]; do sleep 0.1; done; "
        'for i in $(seq 6 9); do echo "line $i"; done'
    )
    job_id = submit(sidecar, command)
    endpoint = SidecarEndpoint(sidecar.url, sidecar.token)

    async def resolve(conn_id: str) -> SidecarEndpoint:
        return endpoint

    def real(log: RecordingLog) -> JobPoller:
        return JobPoller(job_id=job_id, conn_id=CONN, resolve=resolve, log=log, poll_interval=0.1)

    first, second = RecordingLog(), RecordingLog()

    async def until_five_then_cancel() -> None:
        task = asyncio.create_task(real(first).run())
        while len(shown_lines(first)) < 5:
            await asyncio.sleep(0.05)
        task.cancel()  # a triggerer shutting down
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(until_five_then_cancel(), timeout=30))
    # The agent crashes and comes back (its jobs run on); the mark is in the job's directory.
    agent.kill()
    agent.start()
    gate.touch()
    event = asyncio.run(asyncio.wait_for(real(second).run(), timeout=60))  # offset 0, as deferred
    assert event["status"] == "SUCCEEDED", event
    assert shown_lines(first) == [f"line {i}" for i in range(1, 6)]
    assert shown_lines(second) == [f"line {i}" for i in range(6, 10)]
