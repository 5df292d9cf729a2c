"""``[agent] max_log_bytes`` holds at every moment, not just now and then: a job writing 300 MiB as fast
as it can never has more than twice the cap of output on disk, while it writes or after it ended, and
the log still reads by offsets (the head, one line saying what was dropped, the tail). The job runs
on whatever happens to the agent; its children writing after it exited are capped too.

Real agents, real supervisors, real jobs. On-disk bytes are ``st_blocks * 512`` of ``output.log``,
sampled every 10 ms from a thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from agent.logcap import CappedLog, copy_until_closed, open_pipe
from agent.process_tree import ProcessRef
from agent.spawn import handshake
from agent.state import ShellRecord
from harness.agent import REPO_ROOT, AgentProcess
from harness.processes import wait_until

CAP = 2 * 1024 * 1024
BOUND = 2 * CAP  # the requirement: on-disk bytes of output.log never above twice the cap
NOTE = rb"\[agent: output bytes (\d+)-(\d+) dropped: .*max_log_bytes=(\d+).*\]\n"


class DiskSampler:
    """The largest on-disk size of ``path`` seen, sampled every ``interval`` seconds from a thread."""

    def __init__(self, path: Path, interval: float = 0.01) -> None:
        self.path = path
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-sampler", daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, os.stat(self.path).st_blocks * 512)
                self.samples += 1
            except FileNotFoundError:
                pass
            self._done.wait(self.interval)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def on_disk(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def hole(path: Path) -> tuple[int, int] | None:
    """The range dropped from an output, as the file system says: its hole (start, end), if any."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start = os.lseek(fd, 0, os.SEEK_HOLE) if size else size
        return (start, os.lseek(fd, start, os.SEEK_DATA)) if start < size else None
    finally:
        os.close(fd)


def get(agent: AgentProcess, path: str, **params: int) -> httpx.Response:
    answer = httpx.get(
        f"{agent.url}{path}", params=params, headers={"Authorization": f"Bearer {agent.token}"}, timeout=10
    )
    answer.raise_for_status()
    return answer


def run(agent: AgentProcess, job_id: str, command: str) -> None:
    answer = httpx.post(
        f"{agent.url}/run",
        json={"job_id": job_id, "payload": {"command": command}},
        headers={"Authorization": f"Bearer {agent.token}"},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text


def wait_finished(agent: AgentProcess, job_id: str, timeout: float) -> dict[str, object]:
    seen: dict[str, object] = {}

    def finished() -> bool:
        seen.update(get(agent, f"/jobs/{job_id}").json())
        return seen["status"] not in ("QUEUED", "RUNNING")

    wait_until(finished, timeout=timeout, what=f"job {job_id} finished", interval=0.05)
    return seen


def supervisor_of(job_dir: Path) -> ProcessRef:
    return ProcessRef(*json.loads((job_dir / "state.json").read_text())["supervisor"])


def wait_gone(ref: ProcessRef, timeout: float = 20) -> None:
    """Gone, or a zombie its parent has not reaped yet: it writes nothing more either way."""

    def gone() -> bool:
        try:
            return Path(f"/proc/{ref.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(gone, timeout=timeout, what=f"process {ref.pid} gone")


def read_by_offsets(agent: AgentProcess, job_id: str) -> tuple[bytes, bytes, bytes]:
    """Page through the whole log as a reader does: the bytes before the note, the note, the bytes after."""
    offset, parts, size = 0, [], None
    for _ in range(100):
        chunk = get(agent, f"/jobs/{job_id}/log", offset=offset)
        size = int(chunk.headers["X-Log-Size"])
        parts.append(chunk.content)
        offset = int(chunk.headers["X-Next-Offset"])
        if offset >= size:
            break
    notes = [i for i, part in enumerate(parts) if re.fullmatch(NOTE, part)]
    assert len(notes) == 1, [part[:100] for part in parts]
    before, after = b"".join(parts[: notes[0]]), b"".join(parts[notes[0] + 1 :])
    return before, parts[notes[0]], after


@contextmanager
def cleanup(path: Path) -> Iterator[None]:
    """Big outputs go as soon as the test is done with them (mostly holes, but not only)."""
    try:
        yield
    finally:
        for log in path.rglob("output.log"):
            log.unlink(missing_ok=True)


class Follower:
    """A reader paging through the log by offsets while the job writes, as the task's log does; it
    keeps every answer that held a zero byte (bytes read as they were punched)."""

    def __init__(self, agent: AgentProcess, job_id: str) -> None:
        self.agent, self.job_id = agent, job_id
        self.reads = 0
        self.zeros: list[tuple[int, int]] = []  # (offset asked, where the zero was in the answer)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)

    def _run(self) -> None:
        offset = 0
        while not self._done.is_set():
            chunk = get(self.agent, f"/jobs/{self.job_id}/log", offset=offset, limit=256 * 1024)
            self.reads += 1
            if b"\0" in chunk.content:
                self.zeros.append((offset, chunk.content.index(b"\0")))
            offset = int(chunk.headers["X-Next-Offset"])

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)


def test_a_300_mib_fast_writer_never_has_more_than_twice_the_cap_on_disk(tmp_path: Path) -> None:
    home = tmp_path / "home"
    log = home / "jobs" / "flood" / "output.log"
    with (
        cleanup(home),
        AgentProcess(home, extra_config=f"max_log_bytes = {CAP}\n") as agent,
        DiskSampler(log) as sampler,
    ):
        started = time.monotonic()
        run(agent, "flood", "yes | head -c 300M; echo the-last-line")
        with Follower(agent, "flood") as follower:
            info = wait_finished(agent, "flood", timeout=120)
        assert follower.reads > 1 and follower.zeros == []  # never a punched byte, read as it went
        assert info["status"] == "SUCCEEDED", info
        wait_gone(supervisor_of(log.parent))
        time.sleep(0.05)  # a last sample after the end
        elapsed = time.monotonic() - started
        final = on_disk(log)
        print(
            f"300 MiB in {elapsed:.2f} s: peak {sampler.peak} B, final {final} B ({sampler.samples} samples, "
            f"{follower.reads} reads as it wrote)"
        )
        assert sampler.samples > 10
        assert sampler.peak <= BOUND, f"peak on disk {sampler.peak} > {BOUND}"
        assert final <= BOUND, f"on disk after the end {final} > {BOUND}"

        size = log.stat().st_size
        assert size > 300 * 1024 * 1024  # every offset stays where it was
        assert get(agent, "/jobs/flood/log", offset=0, limit=8).content == b"y\ny\ny\ny\n"
        middle = get(agent, "/jobs/flood/log", offset=150 * 1024 * 1024)
        note = re.fullmatch(NOTE, middle.content)
        assert note is not None, middle.content[:200]
        assert int(note.group(3)) == CAP
        assert int(middle.headers["X-Next-Offset"]) == int(note.group(2))  # the next read goes on after it

        head, _, tail = read_by_offsets(agent, "flood")
        assert head.startswith(b"y\ny\n") and set(head) <= set(b"y\n")
        assert b"\0" not in tail
        assert tail.endswith(b"the-last-line\n") or b"the-last-line\n" in tail[-4096:]
        assert len(head) + len(tail) <= BOUND


# ---------------------------------------------------------------------------------- the job's side


def test_the_cap_holds_through_an_agent_stopped_with_sigstop_and_the_job_runs_on(tmp_path: Path) -> None:
    """A frozen agent neither holds the job back nor lets its output run over the cap."""
    home = tmp_path / "home"
    job_dir = home / "jobs" / "frozen"
    with (
        cleanup(home),
        AgentProcess(home, extra_config=f"max_log_bytes = {CAP}\n") as agent,
        DiskSampler(job_dir / "output.log") as sampler,
    ):
        run(agent, "frozen", "yes | head -c 100M; echo the-last-line")
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            wait_until((job_dir / "exit.json").exists, timeout=60, what="the job's end, agent stopped")
            wait_gone(supervisor_of(job_dir))
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        assert json.loads((job_dir / "exit.json").read_text())["rc"] == 0
        final = on_disk(job_dir / "output.log")
        assert sampler.peak <= BOUND and final <= BOUND, (sampler.peak, final)
        assert wait_finished(agent, "frozen", timeout=20)["status"] == "SUCCEEDED"
        _, _, tail = read_by_offsets(agent, "frozen")
        assert b"the-last-line\n" in tail[-4096:]


def test_a_job_adopted_by_a_restarted_agent_stays_capped_and_reads_by_offsets(tmp_path: Path) -> None:
    home = tmp_path / "home"
    job_dir = home / "jobs" / "adopted"
    config = f"max_log_bytes = {CAP}\n"
    command = "yes | head -c 50M; sleep 2; yes | head -c 50M; echo the-last-line"
    with cleanup(home), DiskSampler(job_dir / "output.log") as sampler:
        first = AgentProcess(home, extra_config=config).start()
        try:
            run(first, "adopted", command)
            assert get(first, "/jobs/adopted/log", offset=0, limit=4).content == b"y\ny\n"
        finally:
            first.kill()  # a crash: the job and its supervisor run on
        with AgentProcess(home, extra_config=config) as second:
            assert wait_finished(second, "adopted", timeout=60)["status"] == "SUCCEEDED"
            wait_gone(supervisor_of(job_dir))
            final = on_disk(job_dir / "output.log")
            assert sampler.peak <= BOUND and final <= BOUND, (sampler.peak, final)
            head, _, tail = read_by_offsets(second, "adopted")
            assert head.startswith(b"y\ny\n") and b"the-last-line\n" in tail[-4096:]


class Supervised:
    """A job run by a real supervisor, started as the agent starts it, without an agent."""

    def __init__(self, job_dir: Path, command: str, *, max_log_bytes: int = CAP) -> None:
        job_dir.mkdir(parents=True)
        self.job_dir = job_dir
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)}
        with (job_dir / "supervisor.log").open("ab") as errors:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-P", "-m", "agent.supervisor", str(job_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                cwd=job_dir,
                env=env,
                start_new_session=True,
            )
        spec = {"command": command, "cwd": str(job_dir), "env": env, "run_as": None}
        answer = handshake(self.proc, json.dumps({**spec, "max_log_bytes": max_log_bytes}).encode())
        assert isinstance(answer, ShellRecord), answer
        self.shell = answer.ref

    @property
    def log(self) -> Path:
        return self.job_dir / "output.log"

    def __enter__(self) -> Supervised:
        return self

    def __exit__(self, *exc: object) -> None:
        """Whatever is left of the job and its supervisor killed (a test that failed half-way), and
        its output removed."""
        for target in (-self.shell.pid, self.proc.pid):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.log.unlink(missing_ok=True)


def test_children_writing_after_the_job_exited_are_capped_on_stdout_and_stderr(tmp_path: Path) -> None:
    """exit.json comes with the shell's end; its children's output after that is still capped."""
    command = "(sleep 0.5; yes | head -c 100M >&2; echo to-stdout; echo children-done >&2) & echo shell-done"
    with Supervised(tmp_path / "job", command) as job:
        with DiskSampler(job.log) as sampler:
            wait_until((job.job_dir / "exit.json").exists, timeout=10, what="exit.json")
            assert job.proc.poll() is None  # its children still run: it waits for them
            job.proc.wait(timeout=60)
        final = on_disk(job.log)
        print(f"children after the shell's end: peak {sampler.peak} B, final {final} B")
        assert json.loads((job.job_dir / "exit.json").read_text())["rc"] == 0
        assert sampler.peak <= BOUND and final <= BOUND, (sampler.peak, final)
        dropped = hole(job.log)
        assert dropped is not None and dropped[0] == CAP // 2
        with job.log.open("rb") as output:
            assert output.read(16) == b"shell-done\ny\ny\ny"
            output.seek(dropped[1])
            tail = output.read()
        lines = tail.splitlines()
        assert b"\0" not in tail and lines[-3:-1] == [b"to-stdout", b"children-done"]
        assert b"is dropped from its middle" in lines[-1]  # said last, as the output ended
        assert not (job.job_dir / "output.pipe").exists()  # the pipe ended: nothing to take over


# ---------------------------------------------------------------------------------- a killed supervisor

MIB = 1024 * 1024


def after(flag: Path) -> str:
    """Shell: wait until the test creates ``flag``."""
    return f"while [ ! -e {flag} ]; do sleep 0.02; done"


def stop(agent: AgentProcess, job_id: str) -> dict[str, object]:
    answer = httpx.post(
        f"{agent.url}/stop/{job_id}",
        json={"reason": "the test is done"},
        headers={"Authorization": f"Bearer {agent.token}"},
        timeout=30,
    )
    answer.raise_for_status()
    result: dict[str, object] = answer.json()
    return result


def shell_of(job_dir: Path) -> ProcessRef:
    shell = json.loads((job_dir / "leader.json").read_text())
    return ProcessRef(shell["pid"], shell["start_ticks"])


@contextmanager
def orphaned(job_dir: Path) -> Iterator[None]:
    """The job's processes are no agent's descendants once their supervisor is killed: whatever is left of
    them (its process group: the shell's PID) is killed at the end, as the harness cannot."""
    try:
        yield
    finally:
        try:
            os.killpg(json.loads((job_dir / "leader.json").read_text())["pid"], signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def kill_supervisor(job_dir: Path) -> None:
    supervisor = supervisor_of(job_dir)
    os.kill(supervisor.pid, signal.SIGKILL)
    wait_gone(supervisor)


def wrote(flag: Path, log: Path, *, at_least: int) -> None:
    """The job wrote 20 MiB (it made ``flag`` after), all of it into output.log: it did not wait on a
    pipe nobody reads (1 MiB), nor was its output dropped somewhere else. Returns once the output's
    pause is settled: trimmed to the block, and said in the tail."""
    wait_until(flag.exists, timeout=10, what=f"{flag.name}: 20 MiB written with the supervisor gone")
    wait_until(lambda: log.stat().st_size >= at_least, timeout=5, what="the 20 MiB in output.log")

    def settled() -> bool:
        with log.open("rb") as output:
            output.seek(-200, os.SEEK_END)
            return output.read().endswith(b"the first and the latest output are kept\n")

    wait_until(settled, timeout=5, what="the tail saying what was dropped")


def test_a_job_whose_supervisor_was_killed_writes_on_into_its_capped_log_and_still_stops(
    tmp_path: Path,
) -> None:
    """The agent reads the pipe in the supervisor's place: the job is not held in write(), its output
    goes on into the same output.log under the cap, and a stop through the API still ends it."""
    home, go, done = tmp_path / "home", tmp_path / "go", tmp_path / "done"
    job_dir = home / "jobs" / "orphan"
    log = job_dir / "output.log"
    command = f"echo started; {after(go)}; yes | head -c 20M; touch {done}; exec sleep 600"
    with (
        cleanup(home),
        AgentProcess(home, extra_config=f"max_log_bytes = {CAP}\n") as agent,
        orphaned(job_dir),
    ):
        run(agent, "orphan", command)
        kill_supervisor(job_dir)
        before = log.stat().st_size
        with DiskSampler(log) as sampler:
            go.touch()
            wrote(done, log, at_least=before + 20 * MIB)
        assert sampler.peak <= BOUND and on_disk(log) <= BOUND, (sampler.peak, on_disk(log))
        assert get(agent, "/jobs/orphan").json()["status"] == "RUNNING"
        head, _, tail = read_by_offsets(agent, "orphan")
        assert head.startswith(b"started\ny\ny\n") and b"\0" not in tail

        result = stop(agent, "orphan")
        assert result["ok"] is True and result["status"] == "FAILED", result
        assert not shell_of(job_dir).alive()  # a zombie at most: init reaps it
        assert b"job stopped: the test is done" in log.read_bytes()[-4096:]
        pipe = job_dir / "output.pipe"
        wait_until(lambda: not pipe.exists(), timeout=5, what="the agent saw the pipe's end")


def test_the_job_pipe_is_opened_through_the_fd_that_holds_it_and_read_until_its_last_writer_exits(
    tmp_path: Path,
) -> None:
    """A process in a pipeline has another pipe at its fd 1 (``yes | head``: the inner one): only the
    job's pipe is opened, found by its inode, and it is read into the capped log until it ends."""
    inner_read, inner_write = os.pipe()
    job_read, job_write = os.pipe()
    inode = os.fstat(job_read).st_ino
    writer = subprocess.Popen(
        ["sh", "-c", "read go; yes | head -c 3M >&2"],
        stdin=subprocess.PIPE,
        stdout=inner_write,
        stderr=job_write,
    )
    os.close(job_write)
    os.close(job_read)  # only the writer holds the job's pipe now
    try:
        gone_read, gone_write = os.pipe()
        gone = os.fstat(gone_read).st_ino
        os.close(gone_read)
        os.close(gone_write)
        assert open_pipe(gone, [writer.pid]) is None  # a pipe nobody holds any more
        found = open_pipe(inode, [os.getpid(), writer.pid])
        assert found is not None and found[1] == writer.pid
        pipe = found[0]
        assert os.fstat(pipe).st_ino == inode and os.fstat(pipe).st_ino != os.fstat(inner_read).st_ino
        assert writer.stdin is not None
        writer.stdin.write(b"go\n")
        writer.stdin.close()
        log = CappedLog(str(tmp_path), 1024 * 1024)
        assert copy_until_closed(pipe, log, lambda: False)  # True: the last writer is gone
        log.close()
        os.close(pipe)
        assert writer.wait(timeout=10) == 0
        output = tmp_path / "output.log"
        assert output.stat().st_size > 3 * 1024 * 1024 and on_disk(output) <= 2 * 1024 * 1024
        assert output.read_bytes()[:4] == b"y\ny\n"
        os.set_blocking(inner_read, False)
        with pytest.raises(BlockingIOError):
            os.read(inner_read, 1)  # the other pipe: nothing in it, nothing taken from it
    finally:
        writer.kill()
        writer.wait()
        os.close(inner_read)
        os.close(inner_write)


def test_agents_restarted_after_the_supervisor_was_killed_and_while_they_read_take_over_each_time(
    tmp_path: Path,
) -> None:
    """A crash of the agent ends its reading of the job's pipe: the next agent reads it again, whether
    it starts after the supervisor died or while the agent before it was reading."""
    home, flags = tmp_path / "home", [tmp_path / name for name in ("go1", "done1", "go2", "done2")]
    job_dir = home / "jobs" / "restarts"
    log = job_dir / "output.log"
    go1, done1, go2, done2 = flags
    command = (
        f"{after(go1)}; yes | head -c 20M; touch {done1}; "
        f"{after(go2)}; yes | head -c 20M; touch {done2}; exec sleep 600"
    )
    agent = AgentProcess(home, extra_config=f"max_log_bytes = {CAP}\n")
    with cleanup(home), agent, orphaned(job_dir), DiskSampler(log) as sampler:
        run(agent, "restarts", command)
        kill_supervisor(job_dir)
        agent.kill()
        agent.start()  # after the supervisor died: adopted, its pipe read
        go1.touch()
        wrote(done1, log, at_least=20 * MIB)
        agent.kill()  # while it reads
        agent.start()
        go2.touch()
        wrote(done2, log, at_least=40 * MIB)
        assert sampler.peak <= BOUND and on_disk(log) <= BOUND, (sampler.peak, on_disk(log))
        assert stop(agent, "restarts")["status"] == "FAILED"
        assert not shell_of(job_dir).alive()  # a zombie at most: init reaps it


def test_children_writing_after_the_shell_exited_are_read_once_their_supervisor_was_killed(
    tmp_path: Path,
) -> None:
    """The shell exits after its supervisor was killed: the job ends as before (its rc lost), and its
    child writing on is read, by this agent and by the next one, though the job's record has ended."""
    home, go, done = tmp_path / "home", tmp_path / "go", tmp_path / "done"
    job_dir = home / "jobs" / "children"
    log = job_dir / "output.log"
    command = f"({after(go)}; yes | head -c 20M; touch {done}; exec sleep 600) & {after(tmp_path / 'exit')}"
    agent = AgentProcess(home, extra_config=f"max_log_bytes = {CAP}\n")
    with cleanup(home), agent, orphaned(job_dir), DiskSampler(log) as sampler:
        run(agent, "children", command)
        kill_supervisor(job_dir)
        time.sleep(0.3)  # the agent sees the supervisor gone and reads the pipe
        (tmp_path / "exit").touch()
        info = wait_finished(agent, "children", timeout=10)
        assert info["status"] == "FAILED" and info["rc"] is None, info
        agent.kill()
        agent.start()  # the job's record ended: the child is found in output.pipe
        go.touch()
        wrote(done, log, at_least=20 * MIB)
        assert sampler.peak <= BOUND and on_disk(log) <= BOUND, (sampler.peak, on_disk(log))


def test_a_job_outlives_its_killed_supervisor_and_never_dies_of_sigpipe(tmp_path: Path) -> None:
    """Killing the supervisor loses the exit code and the output from then on, not the job."""
    marker = tmp_path / "still-ran"
    command = f"sleep 0.5; echo to-stdout; echo to-stderr >&2; yes | head -c 100K; touch {marker}; sleep 0.2"
    with Supervised(tmp_path / "job", command) as job:
        job.proc.kill()
        job.proc.wait(timeout=10)
        wait_until(marker.exists, timeout=10, what="the job's last command, after its supervisor died")


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A file system without hole punching (ramfs); the test is skipped where it cannot be mounted."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], capture_output=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def test_without_hole_punching_the_job_writes_its_whole_output_itself(ramfs: Path) -> None:
    with Supervised(ramfs / "job", "yes | head -c 5M; echo the-last-line", max_log_bytes=64 * 1024) as job:
        job.proc.wait(timeout=30)
        assert json.loads((job.job_dir / "exit.json").read_text())["rc"] == 0
        assert job.log.stat().st_size == 5 * 1024 * 1024 + len(b"the-last-line\n")
        assert hole(job.log) is None
        assert "no hole punching" in (job.job_dir / "supervisor.log").read_text()
