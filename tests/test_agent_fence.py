"""At most one copy runs: an agent cut off from the sidecar fences its ``at_most_once`` jobs itself.

Real agent processes (and, for a registered agent, a real sidecar process) and real job process trees:
a sidecar stopped (SIGSTOP) longer than ``fence_after_seconds`` has the agent stop its at_most_once
job's whole tree (SIGTERM, grace, SIGKILL), with the reason readable on the agent, while a job that did
not ask runs on; a shorter outage stops nothing; after SIGCONT the sidecar learns how the fenced job
ended. An agent in ``[[agents]]`` counts the calls that pass its token check as contact; a restarted
agent counts contact from its start; a paused agent fences on resume even if the sidecar then answers.
The decision itself is pinned without processes in tests/test_fence.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.fence import FENCE_REASON
from agent_api.protocol import RunPayload
from harness.agent import AgentProcess, new_id, with_client
from harness.processes import alive, process_group, wait_for, wait_until
from harness.served import ServedAirflow
from tests.test_agent_credentials import registering, sidecar_for
from tests.test_registration import agents, submit

FENCE_AFTER = 3.0  # above two heartbeats (0.5 s each, as the registering agents of these tests beat)
GRACE = 0.5  # the harness's grace_seconds
MARGIN = 2.5  # one check period (0.3 s), the stop's bookkeeping, a loaded machine
FENCED_CONFIG = f"fence_after_seconds = {FENCE_AFTER}\n"
# Ignores SIGTERM (inherited by both sleeps): the fence needs the whole escalation, SIGKILL included.
STUBBORN = "trap '' TERM; sleep 300 & sleep 300; wait"
PLAIN = "sleep 300 & sleep 300; wait"


def tree(pid: int) -> list[psutil.Process]:
    """The job's shell and its two sleeps, once all three run (the shell leads their process group)."""
    wait_for(lambda: len(alive(process_group(pid))) == 3, f"the tree of {pid}")
    return alive(process_group(pid))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def on_agent(agent: AgentProcess, job: str, token: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{agent.url}/jobs/{job}", headers=bearer(token), timeout=5).json()
    return answer


def ended_on(agent: AgentProcess, job: str, token: str) -> dict[str, Any]:
    """The job as its agent recorded its end (a moment after its tree is gone: the exit's bookkeeping)."""
    answer: dict[str, Any] = wait_for(
        lambda: (j := on_agent(agent, job, token))["status"] == "FAILED" and j, f"{job} ended", 10
    )
    return answer


def jobs_running(agent: AgentProcess) -> int:
    """From /healthz, which carries no token: asking it is no contact."""
    count: int = httpx.get(f"{agent.url}/healthz", timeout=5).json()["jobs_running"]
    return count


def placed(client: httpx.Client, airflow: ServedAirflow, agent: AgentProcess, task: str, **extra: Any) -> str:
    """A job of a running task, submitted through the sidecar to ``agent``; its id once it runs."""
    airflow.call_soon(airflow.standin.add, "d", "r", task, -1, "running", 1)
    answer = submit(
        client, task, STUBBORN if extra.get("at_most_once") else PLAIN, agent_id=agent.agent_id, **extra
    )
    assert answer.status_code == 201, answer.text
    job: str = answer.json()["job_id"]
    wait_for(lambda: client.get(f"/jobs/{job}").json()["status"] == "RUNNING", f"{task} running")
    return job


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in alive(procs):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


# -------------------------------------------------------------------------- a registered agent


def test_a_registered_agent_cut_off_from_the_sidecar_fences_its_at_most_once_job_alone(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    with ExitStack() as stack:
        sidecar = stack.enter_context(sidecar_for(tmp_path, airflow))
        assert sidecar.proc is not None
        client = stack.enter_context(sidecar.client())
        agent = stack.enter_context(registering(tmp_path / "vm", sidecar, "vm-f", extra_config=FENCED_CONFIG))
        wait_for(lambda: agents(client).get("vm-f", {}).get("state") == "live", "registered")
        fenced = placed(client, airflow, agent, "fenced", at_most_once=True)
        kept = placed(client, airflow, agent, "kept")
        calls = agent.call_token()  # as the sidecar calls it: no contact for a registered agent
        fenced_tree = tree(on_agent(agent, fenced, calls)["pid"])
        kept_tree = tree(on_agent(agent, kept, calls)["pid"])
        stack.callback(kill_all, fenced_tree + kept_tree)

        # An outage shorter than fence_after_seconds stops nothing, then or later.
        os.kill(sidecar.proc.pid, signal.SIGSTOP)
        time.sleep(FENCE_AFTER / 2)
        os.kill(sidecar.proc.pid, signal.SIGCONT)
        time.sleep(FENCE_AFTER + 1)
        assert alive(fenced_tree) == fenced_tree and alive(kept_tree) == kept_tree
        assert on_agent(agent, fenced, calls)["status"] == "RUNNING"

        # A longer one: the agent stops the at_most_once job's whole tree, and only that job.
        os.kill(sidecar.proc.pid, signal.SIGSTOP)
        try:
            took = wait_until(
                lambda: not alive(fenced_tree),
                timeout=FENCE_AFTER + GRACE + MARGIN,
                what="the fenced tree gone",
            )
            # Not before its last accepted heartbeat (sent at most one heartbeat before the SIGSTOP) is
            # fence_after_seconds old.
            assert took >= FENCE_AFTER - 0.5 - 0.1, took
            ended = ended_on(agent, fenced, calls)
            assert ended["status"] == "FAILED" and ended["reason"].startswith(FENCE_REASON + " "), ended
            assert alive(kept_tree) == kept_tree and on_agent(agent, kept, calls)["status"] == "RUNNING"
            # While cut off, no new at_most_once job starts here; the sidecar may place it elsewhere.
            body = {"job_id": new_id(), "payload": {"command": "true", "at_most_once": True}}
            refused = httpx.post(f"{agent.url}/run", json=body, headers=bearer(calls), timeout=5)
            assert refused.status_code == 503 and "takes no at_most_once job" in refused.json()["error"]
            print(f"fenced tree gone {took:.2f} s after the sidecar stopped")
        finally:
            os.kill(sidecar.proc.pid, signal.SIGCONT)

        # Contact back: the sidecar hears how the fenced job ended, with the agent's reason.
        heard = wait_for(
            lambda: (j := client.get(f"/jobs/{fenced}").json())["status"] == "FAILED" and j, "end heard", 20
        )
        assert heard["reason"].startswith(FENCE_REASON + " "), heard
        assert client.get(f"/jobs/{kept}").json()["status"] == "RUNNING" and alive(kept_tree) == kept_tree


# ------------------------------------------------------------------------ an agent in [[agents]]


def unregistered(home: Path, **kwargs: Any) -> AgentProcess:
    """An agent the sidecar would list in [[agents]]: contact is a call that passes its token check."""
    return AgentProcess(home, extra_config=f"heartbeat_seconds = 1.0\n{FENCED_CONFIG}", **kwargs)


def start_two(agent: AgentProcess) -> tuple[str, str]:
    fenced, kept = new_id(), new_id()

    async def run(client: Any) -> None:
        await client.run(fenced, RunPayload(command=STUBBORN, at_most_once=True))
        await client.run(kept, RunPayload(command=PLAIN))

    with_client(agent, run)
    return fenced, kept


def test_an_agent_nobody_calls_fences_its_at_most_once_job_and_leaves_the_other(tmp_path: Path) -> None:
    with unregistered(tmp_path / "agent") as agent:
        fenced, kept = start_two(agent)
        fenced_tree = tree(on_agent(agent, fenced, agent.token)["pid"])
        kept_tree = tree(on_agent(agent, kept, agent.token)["pid"])
        last_call = time.monotonic()  # the GET just above: nothing with a token from here on
        try:
            wait_until(
                lambda: not alive(fenced_tree),
                timeout=FENCE_AFTER + GRACE + MARGIN,
                what="the fenced tree gone",
            )
            silent = time.monotonic() - last_call
            assert FENCE_AFTER - 0.1 <= silent <= FENCE_AFTER + GRACE + MARGIN, silent
            print(f"fenced tree gone {silent:.2f} s after the last call")
            ended = ended_on(agent, fenced, agent.token)
            assert jobs_running(agent) == 1 and alive(kept_tree) == kept_tree
            assert ended["status"] == "FAILED" and ended["reason"].startswith(FENCE_REASON + " ")
            assert (
                "job stopped: fenced: no contact" in (agent.home / "jobs" / fenced / "output.log").read_text()
            )
        finally:
            kill_all(fenced_tree + kept_tree)


def test_an_agent_that_fences_every_job_fences_one_that_did_not_ask(tmp_path: Path) -> None:
    """[agent] at_most_once_default: the agent's own choice covers jobs submitted without the flag."""
    home = tmp_path / "agent"
    config = f"heartbeat_seconds = 1.0\n{FENCED_CONFIG}at_most_once_default = true\n"
    started = time.monotonic()  # no health check will come: the agent counts contact from its start
    with AgentProcess(home, extra_config=config) as agent:
        job = new_id()
        with_client(agent, lambda client: client.run(job, RunPayload(command=PLAIN)))
        job_tree = tree(on_agent(agent, job, agent.token)["pid"])
        try:
            wait_until(
                lambda: not alive(job_tree),
                timeout=started + FENCE_AFTER + GRACE + MARGIN - time.monotonic(),
                what="the job's tree gone",
            )
            assert time.monotonic() - started >= FENCE_AFTER
            assert ended_on(agent, job, agent.token)["reason"].startswith(FENCE_REASON + " ")
        finally:
            kill_all(job_tree)


def test_only_health_checks_with_its_token_keep_an_agent_in_agents_from_fencing(tmp_path: Path) -> None:
    """The leader's health check (a GET /health with the agent's token) is contact; a job read, a
    wrong token and /healthz without one are not: a standby's calls, or anyone's, prove nothing of
    what the leader thinks of the agent."""
    with unregistered(tmp_path / "agent") as agent:
        fenced, _ = start_two(agent)
        fenced_tree = tree(on_agent(agent, fenced, agent.token)["pid"])
        try:
            for _ in range(int(2 * FENCE_AFTER)):  # two fences' worth, a check every second
                time.sleep(1.0)
                checked = httpx.get(f"{agent.url}/health", headers=bearer(agent.token), timeout=5)
                assert checked.status_code == 200 and checked.json()["agent_id"] == agent.agent_id
            assert alive(fenced_tree) == fenced_tree
            last_check = time.monotonic()

            def other_calls_only() -> bool:
                assert on_agent(agent, fenced, agent.token)["status"] in ("RUNNING", "FAILED")  # a job read
                wrong = httpx.get(f"{agent.url}/health", headers=bearer("wrong"), timeout=5)
                assert wrong.status_code == 200 and jobs_running(agent) >= 0  # answered, no contact
                return not alive(fenced_tree)

            wait_until(other_calls_only, timeout=FENCE_AFTER + GRACE + MARGIN, what="gone", interval=0.2)
            assert time.monotonic() - last_check >= FENCE_AFTER - 0.1
        finally:
            kill_all(fenced_tree)


def test_a_restarted_agent_counts_contact_from_its_start(tmp_path: Path) -> None:
    """Killed and restarted after longer than fence_after_seconds: the adopted at_most_once job is not
    fenced at once (the new process heard nothing yet, but has not been silent that long either), and
    is fenced fence_after_seconds after the start without contact."""
    first = unregistered(tmp_path / "agent")
    trees: list[psutil.Process] = []
    try:
        first.start()
        fenced, kept = start_two(first)
        fenced_tree = tree(on_agent(first, fenced, first.token)["pid"])
        kept_tree = tree(on_agent(first, kept, first.token)["pid"])
        trees = fenced_tree + kept_tree
        first.kill()  # its jobs run on, unwatched
        time.sleep(FENCE_AFTER + 1)
        with unregistered(tmp_path / "agent", port=first.port) as restarted:
            started = time.monotonic()
            assert jobs_running(restarted) == 2
            time.sleep(1.0)
            assert alive(fenced_tree) == fenced_tree  # not at once
            took = 1.0 + wait_until(
                lambda: not alive(fenced_tree),
                timeout=FENCE_AFTER + GRACE + MARGIN,
                what="the fenced tree gone",
            )
            assert took <= FENCE_AFTER + GRACE + MARGIN and alive(kept_tree) == kept_tree
            ended = ended_on(restarted, fenced, restarted.token)
            assert ended["reason"].startswith(FENCE_REASON + " "), ended
            print(f"adopted job fenced {time.monotonic() - started:.2f} s after the restarted agent answered")
    finally:
        first.stop()
        kill_all(trees)


def test_a_paused_agent_fences_on_resume_even_if_the_sidecar_answers_at_once(tmp_path: Path) -> None:
    """SIGSTOP the agent past fence_after_seconds while its jobs run on; a call is waiting when it
    resumes. The silence happened (the sidecar may have given up on it meanwhile): it fences."""
    with unregistered(tmp_path / "agent") as agent:
        fenced, kept = start_two(agent)
        fenced_tree = tree(on_agent(agent, fenced, agent.token)["pid"])
        kept_tree = tree(on_agent(agent, kept, agent.token)["pid"])
        try:
            os.kill(agent.pid, signal.SIGSTOP)
            answers: list[int] = []
            try:
                time.sleep(FENCE_AFTER + 1.5)
                # Queued in the listening socket before the resume: the agent finds it at once.
                call = threading.Thread(
                    target=lambda: answers.append(
                        httpx.get(
                            f"{agent.url}/jobs/{kept}", headers=bearer(agent.token), timeout=10
                        ).status_code
                    )
                )
                call.start()
                time.sleep(0.3)
            finally:
                os.kill(agent.pid, signal.SIGCONT)
            call.join(10)
            assert answers == [200]
            wait_until(lambda: not alive(fenced_tree), timeout=GRACE + MARGIN, what="the fenced tree gone")
            assert alive(kept_tree) == kept_tree
            assert ended_on(agent, fenced, agent.token)["reason"].startswith(FENCE_REASON + " ")
        finally:
            kill_all(fenced_tree + kept_tree)
