"""Starting a job: its environment, its supervisor process, and the handshake with the job's shell.

The agent starts ``python -m agent.supervisor <job_dir>`` (see :mod:`agent.supervisor`) in a session of
its own, sends it the job spec on stdin and waits for one line on its stdout: the shell's identity
(PID, start ticks, start time), which it also writes to the job directory, or an error. A start whose
answer was lost is still recognised from that file. The job's environment never touches the disk: it
reaches the supervisor through the pipe, without the agent's own settings and token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import agent
from agent import run_checks
from agent.config import ENV_PREFIX
from agent.errors import JobRejected
from agent.process_tree import ProcessRef
from agent.state import JobDir, ShellRecord
from agent.tracked_job import TrackedJob
from agent_api.protocol import AgentJobStatus, RunPayload

log = logging.getLogger(__name__)

SUPERVISOR_START_TIMEOUT = 30.0  # a Python interpreter starting on a loaded VM


class Spawner:
    """Starts jobs under their supervisors, and reaps those supervisors: they are the agent's children."""

    def __init__(
        self,
        *,
        secret_envs: frozenset[str],
        run_as_users: Sequence[str] = ("*",),
        allow_root_jobs: bool = False,
        max_log_bytes: int = 0,
    ) -> None:
        self._secret_envs = secret_envs  # the variables holding the agent's token and the fleet token
        self._run_as_users = frozenset(run_as_users)  # [agent] run_as_users
        self._allow_root_jobs = allow_root_jobs
        self._max_log_bytes = max_log_bytes  # [agent] max_log_bytes: the supervisor caps as it writes
        self._supervisors: list[subprocess.Popen[bytes]] = []  # ours to reap

    async def job_env(self, payload: RunPayload) -> dict[str, str]:
        """Check the payload against this machine (:mod:`agent.run_checks`: a 400 naming the field,
        before anything is recorded), then build the job's environment."""
        deadline = run_checks.check_deadline()  # one bound for every check of this request
        user = None
        if payload.run_as is None:
            if (problem := run_checks.root_job_problem(self._allow_root_jobs)) is not None:
                raise JobRejected(403, problem)
        else:
            user = await run_checks.find_user(payload.run_as, deadline=deadline)
            groups = await run_checks.user_groups(user, deadline=deadline)
            if (problem := run_checks.run_as_problem(user, groups, self._run_as_users)) is not None:
                raise JobRejected(403, problem)
        env = self._inherited_env()
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        env.update(payload.env or {})
        arg_strlen, arg_max = run_checks.exec_limits()
        too_big = run_checks.exec_size_problem(
            payload.command, env, payload_env=payload.env or {}, arg_strlen=arg_strlen, arg_max=arg_max
        )
        if too_big is not None:
            raise JobRejected(400, too_big)
        if payload.cwd is not None:
            await run_checks.check_cwd(payload.cwd, user, deadline=deadline)
        return env

    async def start(self, job: TrackedJob, payload: RunPayload, env: Mapping[str, str]) -> None:
        """Start the job's supervisor and shell; the job ends RUNNING, or FAILED with the reason."""
        cwd = payload.cwd or _default_cwd(payload.run_as, env)
        spec = {
            "command": payload.command,
            "cwd": cwd,
            "env": dict(env),
            "run_as": payload.run_as,
            "max_log_bytes": self._max_log_bytes,
        }
        try:
            proc = await asyncio.to_thread(self._spawn_supervisor, job.dir)
        except OSError as exc:
            job.finish(AgentJobStatus.FAILED, rc=None, reason=f"could not start the supervisor: {exc}")
            return
        self._supervisors.append(proc)
        supervisor = ProcessRef.of(proc.pid)
        job.save(replace(job.record, supervisor=supervisor))
        try:
            answer = await asyncio.to_thread(handshake, proc, json.dumps(spec).encode())
        except (OSError, TimeoutError, ValueError) as exc:
            answer = f"no answer from the supervisor: {exc}"
        if isinstance(answer, str):
            shell = job.read_shell()  # a late answer may still have started it
            if shell is None:
                with contextlib.suppress(OSError):
                    proc.kill()  # our own child, and it started nothing
                job.finish(AgentJobStatus.FAILED, rc=None, reason=f"could not start: {answer}")
                log.warning("job %s could not start: %s", job.record.job_id, answer)
                return
        else:
            shell = answer
        job.mark_running(shell)
        log.info("job %s started: pid %d", job.record.job_id, shell.ref.pid)

    def reap(self) -> None:
        """Collect the exit status of supervisors that ended, so none lingers as a zombie."""
        self._supervisors = [proc for proc in self._supervisors if proc.poll() is None]

    def _inherited_env(self) -> dict[str, str]:
        """The agent's environment without its own settings and tokens: jobs must see neither the
        agent's token nor the fleet token (with which a job could register agents, or reach others)."""
        return {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(ENV_PREFIX) and key not in self._secret_envs
        }

    def _spawn_supervisor(self, job_dir: JobDir) -> subprocess.Popen[bytes]:
        package_root = str(Path(agent.__file__).resolve().parent.parent)
        env = self._inherited_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with job_dir.supervisor_log_path.open("ab") as errors:
            return subprocess.Popen(
                # -S: no site (its .pth files and import finders cost more than the supervisor itself);
                # -P: nothing from the working directory shadows the agent's modules
                [sys.executable, "-S", "-P", "-m", "agent.supervisor", str(job_dir.path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                cwd=job_dir.path,
                env=env,
                start_new_session=True,  # survives the agent and signals sent to the agent's group
            )


def handshake(proc: subprocess.Popen[bytes], spec: bytes) -> ShellRecord | str:
    """Send the job spec to the supervisor; read its one-line answer: the job's shell, or its error."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(spec)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died early; the empty answer below says so
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
    buffer = b""
    try:
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer within {SUPERVISOR_START_TIMEOUT:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buffer += chunk
    finally:
        proc.stdout.close()
    if not buffer.strip():
        raise ValueError("the supervisor exited without an answer (see supervisor.log of the job)")
    answer = json.loads(buffer.split(b"\n", 1)[0])
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return str(answer["error"])
    try:
        return ShellRecord.from_json(answer)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unexpected answer from the supervisor: {answer!r} ({exc})") from None


def _default_cwd(run_as: str | None, env: Mapping[str, str]) -> str:
    """The agent's working directory; for ``run_as``, that user's home if it exists, else ``/``."""
    if run_as is None:
        return os.getcwd()
    home = env.get("HOME", "/")
    return home if os.path.isdir(home) else "/"  # never raises, unlike Path.is_dir
