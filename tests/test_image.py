"""The container image, built and run: an agent and a sidecar in containers of the image on the host
network (each listening on 127.0.0.1 only), a job submitted through the sidecar running inside the
agent's container and stopped there, the ``agentic`` CLI, the non-root user, and tini reaping orphans.

Built offline as harness/image.py does (a local Debian base, the wheelhouse from locks/dev.txt, podman
with runc; scripts/ensure-tools installs them), under a tag of its own that is removed afterwards, with
every container it started. No Airflow: the sidecar points at a port nobody listens on, so the poll
stops nothing (Airflow unreachable is never a reason to stop) and the job ends only by hand.
~1.5 min, most of it the build; the first run on a machine also makes the base and the wheelhouse.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.image import PODMAN, ULIMITS, Built, build, missing_tools, podman, remove_image, run
from harness.processes import free_port, wait_for

RUN = (*ULIMITS, "--network", "host")
AGENT_ID = "image-agent"
SIDECAR_TOKEN_FILE = "/run/secrets/agentic-sidecar-token"

# Every process of a container, from its /proc (the image has no ps): pid, ppid, state, uid, argv.
PROCESSES = r"""
import json, os
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        continue
    found.append({"pid": int(pid), "ppid": int(status["PPid"]), "state": status["State"].split()[0],
                  "uid": int(status["Uid"].split()[0]), "argv": argv})
print(json.dumps(found))
"""


@dataclass(frozen=True)
class Stack:
    image: str
    agent: str  # container names
    sidecar: str
    agent_url: str
    sidecar_url: str
    env: dict[str, str]  # podman's environment: the containers take their secrets from it by name

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['AGENTIC_TOKEN']}"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if missing := missing_tools():
        pytest.fail(
            f"{', '.join(missing)} not found: scripts/ensure-tools (run by scripts/test) installs them"
        )
    tag = f"localhost/agentic-airflow:test-{uuid.uuid4().hex[:12]}"
    try:
        yield build(tag, log=tmp_path_factory.mktemp("image") / "build.log")
    finally:
        remove_image(tag)


@pytest.fixture(scope="module")
def stack(image: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("containers")
    agent_port, sidecar_port, nobody = free_port(), free_port(), free_port()
    agent_url = f"http://127.0.0.1:{agent_port}"
    agent_toml = tmp / "agent.toml"
    agent_toml.write_text(
        f'[agent]\nid = "{AGENT_ID}"\nhost = "127.0.0.1"\nport = {agent_port}\n'
        'home = "/var/lib/agentic-agent"\ntoken_env = "AGENTIC_AGENT_TOKEN"\ngrace_seconds = 2.0\n'
        "poll_seconds = 0.2\n"
    )
    sidecar_toml = tmp / "reconciler.toml"
    sidecar_toml.write_text(
        f'[airflow]\nbase_url = "http://127.0.0.1:{nobody}"\napi_version = "v2"\ntimeout_seconds = 2.0\n'
        '[router_db]\nurl = "sqlite:////var/lib/agentic/router.db"\n'
        f'[http]\nhost = "127.0.0.1"\nport = {sidecar_port}\ntoken_file = "{SIDECAR_TOKEN_FILE}"\n'
        f'[[agents]]\nid = "{AGENT_ID}"\nurl = "{agent_url}"\ntoken_env = "AGENTIC_AGENT_TOKEN"\n'
    )
    env = {
        **os.environ,
        "AGENTIC_AGENT_TOKEN": secrets.token_urlsafe(24),
        "AGENTIC_TOKEN": secrets.token_urlsafe(24),
        "AIRFLOW_PASSWORD": secrets.token_urlsafe(12),
    }
    token_file = tmp / "sidecar-token"
    token_file.write_text(env["AGENTIC_TOKEN"] + "\n")
    token_file.chmod(0o644)  # uid 10001 reads it through the mount; its directory stays the test's alone
    prefix = f"agentic-test-{uuid.uuid4().hex[:8]}"
    stack = Stack(
        image=image.tag,
        agent=f"{prefix}-agent",
        sidecar=f"{prefix}-sidecar",
        agent_url=agent_url,
        sidecar_url=f"http://127.0.0.1:{sidecar_port}",
        env=env,
    )
    try:
        # Secrets go by name (-e NAME: the value from podman's environment), never on a command line.
        start(
            stack, stack.agent,
            "-e", "AGENTIC_AGENT_TOKEN", "-e", f"AGENTIC_HEALTH_URL={stack.agent_url}/healthz",
            "-v", f"{agent_toml}:/etc/agentic/agent.toml:ro",
            image.tag, "python", "-m", "agent", "--config", "/etc/agentic/agent.toml",
        )  # fmt: skip
        start(
            stack, stack.sidecar,
            "-e", "AGENTIC_AGENT_TOKEN", "-e", "AIRFLOW_PASSWORD",
            "-e", f"AGENTIC_HEALTH_URL={stack.sidecar_url}/healthz",
            "-v", f"{sidecar_toml}:/etc/agentic/reconciler.toml:ro",
            "-v", f"{token_file}:{SIDECAR_TOKEN_FILE}:ro",
            image.tag,  # the image's default command: the sidecar
        )  # fmt: skip
        for name, url in ((stack.agent, stack.agent_url), (stack.sidecar, stack.sidecar_url)):
            wait_healthy(name, f"{url}/healthz")
        yield stack
    finally:
        for name in (stack.sidecar, stack.agent):
            podman("rm", "--force", "--ignore", "--time", "0", name)


def start(stack: Stack, name: str, *args: str) -> None:
    run([*PODMAN, "run", "--detach", "--name", name, *RUN, *args], env=stack.env, timeout=60)


def wait_healthy(name: str, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if podman("container", "inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
            pytest.fail(f"{name} exited:\n{logs(name)}")
        time.sleep(0.2)
    pytest.fail(f"{url} not healthy within {timeout:g} s:\n{logs(name)}")


def logs(name: str) -> str:
    result = podman("logs", "--tail", "40", name, check=False)
    return result.stdout + result.stderr


def processes(container: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(podman("exec", container, "python", "-c", PROCESSES).stdout)
    return found


def exec_in(container: str, *argv: str) -> tuple[int, str]:
    result = podman("exec", container, *argv, check=False)
    return result.returncode, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ tests


def test_both_services_answer_on_loopback_and_pass_the_image_healthcheck(stack: Stack) -> None:
    agent = httpx.get(f"{stack.agent_url}/healthz", timeout=5)
    assert agent.status_code == 200 and agent.json()["agent_id"] == AGENT_ID
    assert httpx.get(f"{stack.sidecar_url}/healthz", timeout=5).status_code == 200

    def agent_live() -> bool:  # the sidecar's container reaches the agent's (its health checks)
        agents = httpx.get(f"{stack.sidecar_url}/agents", headers=stack.auth(), timeout=5).json()["agents"]
        return [(a["agent_id"], a["state"]) for a in agents] == [(AGENT_ID, "live")]

    wait_for(agent_live, "the agent live in the sidecar's view", timeout=20, interval=0.5)
    for url in (stack.agent_url, stack.sidecar_url):
        assert listening_on(int(url.rsplit(":", 1)[1])) == {"0100007F"}, f"{url}: not on 127.0.0.1 alone"
    for name in (stack.agent, stack.sidecar):
        # The image's HEALTHCHECK (kept: built in docker format), run once as the engine would.
        result = podman("healthcheck", "run", name, check=False)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}\n{logs(name)}"


def listening_on(port: int) -> set[str]:
    """The local addresses (as /proc/net/tcp* writes them) of every socket listening on ``port``: the
    containers share the host's network, so the host's table holds theirs."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_the_services_run_as_uid_10001_under_tini(stack: Stack, image: Built) -> None:
    config = podman("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}", image.tag)
    assert config.stdout.split(" ", 1) == ["10001:10001", '["tini","--"]\n']
    for name, module in ((stack.agent, "agent"), (stack.sidecar, "reconciler")):
        assert exec_in(name, "id", "-u") == (0, "10001\n")
        procs = {p["pid"]: p for p in processes(name)}
        assert procs[1]["argv"][0].endswith("tini"), procs[1]
        (service,) = [p for p in procs.values() if p["ppid"] == 1 and p["argv"][1:3] == ["-m", module]]
        assert service["uid"] == 10001 and procs[1]["uid"] == 10001


def test_a_job_submitted_through_the_sidecar_runs_in_the_agent_container_until_stopped(stack: Stack) -> None:
    marker = uuid.uuid4().hex
    submitted = httpx.post(
        f"{stack.sidecar_url}/jobs",
        headers=stack.auth(),
        json={
            "dag_id": "image_test",
            "task_id": "sleep",
            "run_id": marker,
            "try_number": 1,
            "agent_id": AGENT_ID,
            "command": f"echo started {marker}; exec sleep 300",
        },
        timeout=30,
    )
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["job_id"]

    def sleeping() -> list[dict[str, Any]]:
        return [p for p in processes(stack.agent) if p["argv"] == ["sleep", "300"] and p["state"] != "Z"]

    (job,) = wait_for(sleeping, "the job's sleep 300 in the agent container", timeout=20)
    assert job["uid"] == 10001
    assert not [p for p in processes(stack.sidecar) if p["argv"][:1] == ["sleep"]]
    output = httpx.get(f"{stack.sidecar_url}/jobs/{job_id}/log", headers=stack.auth(), timeout=10)
    assert f"started {marker}" in output.text

    # Airflow cannot confirm (there is none), so only a person's forced stop ends it: the CLI's.
    code, said = exec_in(
        stack.sidecar,
        "agentic", "--url", stack.sidecar_url, "--token-file", SIDECAR_TOKEN_FILE,
        "jobs", "stop", job_id, "--force", "--reason", "the image test is over",
    )  # fmt: skip
    assert code == 0 and said.startswith(("stopped:", "stop_requested:")), said

    def ended() -> dict[str, Any] | None:
        job = httpx.get(f"{stack.sidecar_url}/jobs/{job_id}", headers=stack.auth(), timeout=10).json()
        return job if job["status"] == "FAILED" else None

    record = wait_for(ended, "the job recorded FAILED", timeout=30)
    assert "without Airflow's confirmation" in record["reason"], record
    wait_for(lambda: not sleeping(), "the job's process gone from the agent container", timeout=15)
    assert not [p for p in processes(stack.agent) if p["state"] == "Z"]

    # The CLI in a container of its own, as a person on call runs it, token from the environment.
    url = f"AGENTIC_SIDECAR_URL={stack.sidecar_url}"
    listed = run(
        [*PODMAN, "run", "--rm", *RUN, "-e", url, "-e", "AGENTIC_TOKEN", stack.image,
         "agentic", "jobs", "list", "--dag", "image_test", "--json"],
        env=stack.env,
        timeout=60,
    )  # fmt: skip
    assert [(j["job_id"], j["status"]) for j in json.loads(listed.stdout)] == [(job_id, "FAILED")]


def test_the_cli_starts_from_the_image(image: Built) -> None:
    result = podman("run", "--rm", *RUN, image.tag, "agentic", "--help")
    assert "usage: agentic" in result.stdout and "jobs" in result.stdout


def test_tini_reaps_an_orphaned_grandchild(stack: Stack) -> None:
    # The shell's subshell starts `sleep 3` and exits: the orphan goes to PID 1, tini, which must
    # reap it when it ends (an agent's job processes orphaned so would otherwise stay zombies).
    orphan_shell = "(sleep 3 & echo $! > /tmp/orphan.pid); cat /tmp/orphan.pid"
    code, said = exec_in(stack.agent, "sh", "-c", orphan_shell)
    assert code == 0, said
    pid = int(said.strip())
    orphan = {p["pid"]: p for p in processes(stack.agent)}.get(pid)
    assert orphan is not None and orphan["ppid"] == 1 and orphan["argv"] == ["sleep", "3"], orphan

    def reaped() -> bool:
        return pid not in {p["pid"] for p in processes(stack.agent)}

    wait_for(reaped, f"the orphan {pid} reaped (not a zombie)", timeout=15, interval=0.5)
    assert not [p for p in processes(stack.agent) if p["state"] == "Z"]


def test_secrets_stay_out_of_the_containers_command_lines(stack: Stack) -> None:
    for name in (stack.agent, stack.sidecar):
        argv = " ".join(" ".join(p["argv"]) for p in processes(name))
        for secret in ("AGENTIC_AGENT_TOKEN", "AGENTIC_TOKEN", "AIRFLOW_PASSWORD"):
            assert stack.env[secret] not in argv


def test_the_runtime_stage_holds_no_build_leftovers(image: Built) -> None:
    assert image.size_bytes < 400e6, f"{image.size_bytes / 1e6:.0f} MB"
    code, said = exec_in_image(
        image.tag, "sh", "-c",
        "test ! -e /wheels && test ! -e /src && test -z \"$PIP_NO_INDEX\" && ! command -v gcc"
        " && ! python -c 'import setuptools' 2>/dev/null"
        " && python -c 'import agentic_cli, agent, reconciler'",
    )  # fmt: skip
    assert code == 0, said


def exec_in_image(tag: str, *argv: str) -> tuple[int, str]:
    result = podman("run", "--rm", *RUN, "--entrypoint", argv[0], tag, *argv[1:], check=False)
    return result.returncode, result.stdout + result.stderr
