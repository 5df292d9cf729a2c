"""What a real agent process does with a ``/run`` whose ``cwd``, ``run_as``, command or environment
this machine cannot use: a 400 in the agent's JSON error shape naming the field, nothing recorded,
and the agent still healthy. A job it can use still starts.

``run_as`` needs an agent running as root (as CI runs the tests); root can enter any directory, so
the directories closed to a user are tried with ``run_as: nobody``.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.agent import AgentProcess

MAX_BODY = 4 * 1024 * 1024
ARG_STRLEN = 32 * os.sysconf("SC_PAGE_SIZE")  # Linux: the longest one argument or variable may be


def _nobody() -> str | None:
    try:
        return pwd.getpwnam("nobody").pw_name
    except KeyError:
        return None


NOBODY = _nobody()
as_root_with_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None, reason="run_as needs an agent running as root, and a user nobody"
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    home = tmp_path_factory.mktemp("run-checks") / "home"
    # root is named: the checks' test of a directory root may enter runs a job as root.
    allowed = 'run_as_users = ["*", "root"]\n'
    with AgentProcess(home, token="run-checks-token", max_body_bytes=MAX_BODY, extra_config=allowed) as proc:
        yield proc


@pytest.fixture(scope="module")
def places() -> Iterator[dict[str, Path]]:
    """Directories under /tmp (pytest's own tmp_path sits in a 0700 directory nobody cannot enter):
    one everybody may enter, one closed (0700, root's) with an open directory inside, and a file."""
    root = Path(tempfile.mkdtemp(prefix="run-checks-", dir="/tmp"))
    try:
        root.chmod(0o755)
        open_dir = root / "open"
        open_dir.mkdir(mode=0o755)
        closed = root / "closed"
        closed.mkdir()
        closed.chmod(0o700)
        inner = closed / "inner"
        inner.mkdir()
        inner.chmod(0o755)
        a_file = root / "file"
        a_file.write_text("not a directory\n")
        loop = root / "loop"
        loop.symlink_to(loop)
        yield {"root": root, "open": open_dir, "closed": closed, "inner": inner, "file": a_file, "loop": loop}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(agent: AgentProcess, job_id: str, **payload: Any) -> httpx.Response:
    body = {"job_id": job_id, "payload": {"command": "pwd; id -un", **payload}}
    headers = {"Authorization": f"Bearer {agent.token}"}
    return httpx.post(f"{agent.url}/run", json=body, headers=headers, timeout=30)


def _refused(agent: AgentProcess, job_id: str, field: str, *, says: str = "", **payload: Any) -> str:
    """POST /run with ``payload``: a 400 naming ``field`` (and ``says``); nothing recorded; healthy."""
    answer = _run(agent, job_id, **payload)
    assert answer.status_code == 400, (answer.status_code, answer.text)
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert set(answer.json()) == {"error"} and f"payload.{field}" in error, error
    assert says in error, error
    headers = {"Authorization": f"Bearer {agent.token}"}
    assert httpx.get(f"{agent.url}/jobs/{job_id}", headers=headers, timeout=10).status_code == 404
    assert not (agent.home / "jobs" / job_id).exists()
    assert httpx.get(f"{agent.url}/healthz", timeout=10).status_code == 200
    return str(error)


def _output(agent: AgentProcess, job_id: str) -> str:
    headers = {"Authorization": f"Bearer {agent.token}"}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        job = httpx.get(f"{agent.url}/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("SUCCEEDED", "FAILED"):
            assert job["status"] == "SUCCEEDED", job
            return httpx.get(f"{agent.url}/jobs/{job_id}/log", headers=headers, timeout=10).text
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end within 15 s")


def test_a_cwd_component_of_256_characters_is_a_400_naming_cwd(agent: AgentProcess) -> None:
    error = _refused(agent, "long-component", "cwd", says="File name too long", cwd="/tmp/" + "a" * 256)
    assert len(error) < 400  # the path is shortened in the answer, not echoed whole


def test_a_cwd_longer_than_a_path_may_be_is_a_400_naming_cwd(agent: AgentProcess) -> None:
    _refused(agent, "long-path", "cwd", says="File name too long", cwd="/" + "/".join(["b" * 200] * 30))


@as_root_with_nobody
def test_a_cwd_under_a_directory_run_as_may_not_enter_is_a_400_naming_cwd(
    agent: AgentProcess, places: dict[str, Path]
) -> None:
    for name in ("inner", "closed"):  # under the closed directory, and the closed directory itself
        error = _refused(
            agent, f"closed-{name}", "cwd", says="Permission denied", cwd=str(places[name]), run_as=NOBODY
        )
        assert repr(NOBODY) in error, error
    # The same user in a directory open to it: the job runs there, as that user.
    assert _run(agent, "open-dir", cwd=str(places["open"]), run_as=NOBODY).status_code == 201
    assert _output(agent, "open-dir").split() == [str(places["open"]), NOBODY]
    # root enters the closed directory: the check is the user's, not the agent's.
    assert _run(agent, "closed-as-root", cwd=str(places["inner"]), run_as="root").status_code == 201
    assert _output(agent, "closed-as-root").split() == [str(places["inner"]), "root"]


def test_every_other_cwd_the_agent_cannot_use_is_a_400_naming_cwd(
    agent: AgentProcess, places: dict[str, Path]
) -> None:
    cases = {
        "missing": ("/no/such/dir", "No such file or directory"),
        "through-a-file": (str(places["file"] / "x"), "Not a directory"),
        "a-file": (str(places["file"]), "Not a directory"),
        "symlink-loop": (str(places["loop"]), "Too many levels of symbolic links"),
        "a-device": ("/dev/null", "Not a directory"),
    }
    for name, (cwd, says) in cases.items():
        _refused(agent, f"cwd-{name}", "cwd", says=says, cwd=cwd)


def test_run_as_a_user_that_does_not_exist_is_a_400_naming_run_as(agent: AgentProcess) -> None:
    for name, user in (("unknown", "no-such-user-here"), ("slash", "a/b"), ("long", "u" * 5000)):
        error = _refused(agent, f"user-{name}", "run_as", run_as=user)
        assert "no such user" in error or "needs the agent to run as root" in error, error
        assert len(error) < 400, error


def test_nul_in_cwd_command_or_env_is_a_400_naming_the_field(agent: AgentProcess) -> None:
    _refused(agent, "nul-cwd", "cwd", cwd="/tmp\0/x")
    _refused(agent, "nul-command", "command", command="true\0")
    _refused(agent, "nul-env", "env", env={"A": "a\0b"})
    _refused(agent, "nul-env-key", "env", env={"A\0B": "1"})


def test_a_command_or_variable_longer_than_exec_takes_is_a_400_naming_the_field(agent: AgentProcess) -> None:
    _refused(agent, "huge-variable", "env", says="'BIG'", env={"BIG": "x" * ARG_STRLEN})
    _refused(agent, "huge-command", "command", command="true " + "x" * ARG_STRLEN)
    # Just inside the limit, the job runs.
    fits = {"BIG": "x" * (ARG_STRLEN - len("BIG=") - 1)}
    assert _run(agent, "variable-fits", command="test ${#BIG} -gt 0", env=fits).status_code == 201
    assert _output(agent, "variable-fits") == ""


def test_the_agent_answers_and_runs_jobs_after_every_refusal(agent: AgentProcess) -> None:
    assert _run(agent, "after-refusals", cwd="/").status_code == 201
    assert _output(agent, "after-refusals").split()[0] == "/"
    assert "Traceback" not in agent.log_text()
    assert json.loads(httpx.get(f"{agent.url}/healthz", timeout=10).text)["status"] == "ok"


@pytest.mark.fast
def test_a_check_that_gets_no_answer_is_a_503_to_retry_and_holds_up_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung mount: the cwd check never returns. The answer is a 503 with Retry-After within the
    bound (the sidecar routes the job elsewhere or the task retries; a 400 would fail it for good), and
    with every check thread hung, the agent's other threaded work still runs at once."""
    from agent import run_checks
    from agent.errors import JobRejected

    release = threading.Event()
    monkeypatch.setattr(run_checks, "CHECK_SECONDS", 0.3)
    monkeypatch.setattr(run_checks, "cwd_problem", lambda path, user, deadline: release.wait(30) and None)

    async def scenario() -> tuple[list[JobRejected], float, float]:
        started = time.monotonic()
        refusals: list[JobRejected] = []
        for _ in range(run_checks.CHECK_THREADS + 2):  # more than the check threads: all hung
            with pytest.raises(JobRejected) as refused:
                await run_checks.check_cwd("/mnt/hung", None, deadline=run_checks.check_deadline())
            refusals.append(refused.value)
        took = time.monotonic() - started
        other = time.monotonic()
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 1), 1.0) == 1
        return refusals, took, time.monotonic() - other

    try:
        refusals, took, other = asyncio.run(scenario())
    finally:
        release.set()
    assert {r.status for r in refusals} == {503}
    assert all(r.headers.get("Retry-After") for r in refusals)
    assert all(r.message.startswith("payload.cwd: cannot be checked now") for r in refusals), refusals
    assert took < (run_checks.CHECK_THREADS + 2) * 0.3 + 1.0
    assert other < 0.5
    assert run_checks.CHECK_SECONDS < 10.0  # the sidecar waits 10 s for /run: the check answers first


@pytest.mark.fast
def test_one_requests_checks_share_one_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow user database, then a hung cwd: the 503 comes once the request's bound has passed, not
    after one bound per check (which would outlast the sidecar's wait for /run)."""
    from agent import run_checks
    from agent.errors import JobRejected

    release = threading.Event()
    getpwnam = pwd.getpwnam
    monkeypatch.setattr(run_checks, "CHECK_SECONDS", 0.6)
    monkeypatch.setattr(run_checks.pwd, "getpwnam", lambda name: time.sleep(0.4) or getpwnam(name))
    monkeypatch.setattr(run_checks, "cwd_problem", lambda path, user, deadline: release.wait(30) and None)

    async def scenario() -> tuple[JobRejected, float]:
        started = time.monotonic()
        deadline = run_checks.check_deadline()
        user = await run_checks.find_user("root", deadline=deadline)
        with pytest.raises(JobRejected) as refused:
            await run_checks.check_cwd("/mnt/hung", user, deadline=deadline)
        return refused.value, time.monotonic() - started

    try:
        refused, took = asyncio.run(scenario())
    finally:
        release.set()
    assert refused.status == 503
    assert took < 0.6 + 0.3, took  # not 0.4 + 0.6


@as_root_with_nobody
def test_who_a_job_may_run_as_is_the_agents_to_decide(tmp_path: Path, places: dict[str, Path]) -> None:
    """[agent] run_as_users and allow_root_jobs, on an agent running as root, through HTTP only: a job
    without run_as, or naming root (by "*"), or a user outside the list, is refused (403 naming
    payload.run_as) and recorded nowhere; the users allowed run their jobs as themselves."""
    headers = {"Authorization": "Bearer policy-token"}

    def refused(agent: AgentProcess, job_id: str, says: str, **payload: Any) -> None:
        answer = _run(agent, job_id, **payload)
        assert answer.status_code == 403, (answer.status_code, answer.text)
        error = answer.json()["error"]
        assert error.startswith("payload.run_as") and says in error, error
        assert httpx.get(f"{agent.url}/jobs/{job_id}", headers=headers, timeout=10).status_code == 404
        assert not (agent.home / "jobs" / job_id).exists()

    where = str(places["open"])
    with AgentProcess(tmp_path / "default", token="policy-token", allow_root_jobs=False) as agent:
        refused(agent, "no-run-as", "allow_root_jobs", cwd=where)
        refused(agent, "as-root", "uid or primary group 0", run_as="root", cwd=where)
        assert _run(agent, "as-nobody", run_as=NOBODY, cwd=where).status_code == 201
        assert _output(agent, "as-nobody").split() == [where, NOBODY]
    listed = 'run_as_users = ["daemon"]\n'
    with AgentProcess(tmp_path / "listed", token="policy-token", extra_config=listed) as agent:
        refused(agent, "not-listed", "not in [agent] run_as_users", run_as=NOBODY, cwd=where)
        assert _run(agent, "as-daemon", run_as="daemon", cwd=where).status_code == 201
        assert _output(agent, "as-daemon").split() == [where, "daemon"]
        # allow_root_jobs = true (the harness's default, as these tests run as root): no run_as runs.
        assert _run(agent, "no-run-as", cwd=where).status_code == 201
        assert _output(agent, "no-run-as").split() == [where, "root"]


def test_a_resent_run_of_a_job_that_runs_is_409_though_its_payload_no_longer_checks(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """The sidecar resends a /run whose answer it lost. The job runs, and has removed its own cwd since:
    the resend must hear "already exists" (it runs), never the 400 a new job with that cwd would get,
    which the sidecar would take for the job's end while its process runs on."""
    workdir = Path(tempfile.mkdtemp(prefix="resent-", dir="/tmp"))
    workdir.chmod(0o755)
    try:
        command = f"rmdir {workdir} && sleep 30"
        assert _run(agent, "resent", cwd=str(workdir), command=command).status_code == 201
        headers = {"Authorization": f"Bearer {agent.token}"}
        deadline = time.monotonic() + 10
        while workdir.exists():
            assert time.monotonic() < deadline, "the job did not remove its cwd"
            time.sleep(0.05)
        again = _run(agent, "resent", cwd=str(workdir), command=command)
        assert again.status_code == 409 and "already exists" in again.json()["error"], again.text
        job = httpx.get(f"{agent.url}/jobs/resent", headers=headers, timeout=10).json()
        assert job["status"] == "RUNNING", job
        httpx.post(f"{agent.url}/stop/resent", json={"force": True}, headers=headers, timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.fast
def test_star_covers_no_account_that_is_root_in_all_but_name() -> None:
    """'*' allows any user but root's equivalents: uid 0, primary group 0, or a member of a group that
    grants root (sudo, wheel, docker, lxd, disk...); each of those only when named."""
    from agent.run_checks import PRIVILEGED_GROUPS, run_as_problem

    def account(name: str, uid: int, gid: int) -> pwd.struct_passwd:
        return pwd.struct_passwd((name, "x", uid, gid, "", "/home/" + name, "/bin/sh"))

    plain, admin = account("ana", 1000, 1000), account("ops", 1001, 1001)
    assert run_as_problem(plain, {"ana"}, ["*"]) is None
    assert "group 'sudo'" in str(run_as_problem(admin, {"ops", "sudo"}, ["*"]))
    assert "group 'docker'" in str(run_as_problem(admin, {"ops", "docker"}, ["*"]))
    assert run_as_problem(admin, {"ops", "sudo"}, ["*", "ops"]) is None  # named: the operator's choice
    assert "primary group 0" in str(run_as_problem(account("gw", 1002, 0), {"root"}, ["*"]))
    assert "uid or primary group 0" in str(run_as_problem(account("toor", 0, 0), {"root"}, ["*"]))
    assert run_as_problem(account("root", 0, 0), {"root"}, ["root"]) is None
    assert "not in [agent] run_as_users" in str(run_as_problem(plain, {"ana"}, ["daemon"]))
    assert {"sudo", "wheel", "docker", "disk"} <= PRIVILEGED_GROUPS
