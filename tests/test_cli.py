"""``agentic``, the CLI for people on call, against a real sidecar and agent: tables, ``--json``, the
job's output, and exit codes scripts can trust."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentic_cli.__main__ import main, parser
from agentic_cli.render import clean, jobs_table
from harness.agent import AgentProcess
from harness.processes import free_port, wait_until
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from tests.certs import make_ca

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    served.start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, airflow: ServedAirflow) -> Iterator[SidecarProcess]:
    base = tmp_path_factory.mktemp("cli")
    with (
        AgentProcess(home=base / "agent", agent_id="agent-1") as agent,
        SidecarProcess(
            workdir=base / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            api_version="v2",
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            # Every job's task instance is one Airflow wants (the stand-in says so): the loop stops
            # nothing, only the CLI does; its cycles record the jobs' exits (the agent's catch-up read).
            interval_seconds=1.0,
        ) as proc,
    ):
        yield proc


def submit(sidecar: SidecarProcess, command: str, task_id: str, airflow: ServedAirflow) -> str:
    airflow.call_soon(airflow.standin.add, "cli", "manual__1", task_id, -1, "running", 1)
    body = {"command": command, "labels": ["default"], "dag_id": "cli", "task_id": task_id,
            "run_id": "manual__1", "map_index": -1, "try_number": 1}  # fmt: skip
    with sidecar.client() as client:
        answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["job_id"])


def run(sidecar: SidecarProcess, *args: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setenv("AGENTIC_SIDECAR_URL", sidecar.url)
    monkeypatch.setenv("AGENTIC_TOKEN", sidecar.token)
    out = io.StringIO()
    code = main(list(args), out=out)
    return code, out.getvalue()


def test_jobs_list_and_show_as_tables_and_json(
    sidecar: SidecarProcess, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(sidecar, "echo listed", "listed", airflow)
    code, table = run(sidecar, "jobs", "list", "--dag", "cli", monkeypatch=monkeypatch)
    assert code == 0 and table.splitlines()[0].split()[:3] == ["JOB", "STATUS", "DAG"]
    assert job_id in table
    code, text = run(sidecar, "--json", "jobs", "list", "--dag", "cli", monkeypatch=monkeypatch)
    assert code == 0 and job_id in [j["job_id"] for j in json.loads(text)]

    wait_until(lambda: run(sidecar, "--json", "jobs", "show", job_id, monkeypatch=monkeypatch)[1].count(
        '"SUCCEEDED"') > 0, timeout=20, what="the job recorded as ended")  # fmt: skip
    code, shown = run(sidecar, "jobs", "show", job_id, monkeypatch=monkeypatch)
    assert code == 0 and shown.splitlines()[0].split() == ["job", job_id]
    changes = [line.split()[1:4] for line in shown.splitlines() if " -> " in line]
    assert changes[0] == ["-", "->", "QUEUED"] and changes[-1][-1] == "SUCCEEDED"  # in time order


def test_jobs_log_prints_the_output_and_follows_it_to_the_end(
    sidecar: SidecarProcess, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(sidecar, "for i in 1 2 3; do echo line $i; sleep 0.3; done", "chatty", airflow)
    code, followed = run(sidecar, "jobs", "log", job_id, "--follow", monkeypatch=monkeypatch)
    assert code == 0 and followed == "line 1\nline 2\nline 3\n"
    code, tail = run(sidecar, "jobs", "log", job_id, "--tail", "7", monkeypatch=monkeypatch)
    assert code == 0 and tail == "line 3\n"


def test_exit_codes_scripts_can_trust(sidecar: SidecarProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(sidecar, "jobs", "show", "0" * 32, monkeypatch=monkeypatch)[0] == 3  # no such job
    monkeypatch.setenv("AGENTIC_TOKEN", "wrong")
    assert main(["jobs", "list"], out=io.StringIO()) == 1  # refused
    monkeypatch.delenv("AGENTIC_TOKEN")
    assert main(["jobs", "list"], out=io.StringIO()) == 2  # no token
    monkeypatch.setenv("AGENTIC_TOKEN", "x")
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "jobs", "list"], out=io.StringIO()) == 4


def test_the_console_script_runs_and_never_prints_the_token(sidecar: SidecarProcess, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(sidecar.token + "\n")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agentic_cli", "--url", sidecar.url, "--token-file", str(token_file),
         "jobs", "list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sidecar.token not in done.stdout + done.stderr and time.monotonic() - started < 30


@pytest.mark.fast
def test_values_cannot_steer_the_terminal() -> None:
    assert clean("evil\x1b[2Jname\n") == "evil\\x1b[2Jname\\n"
    table = jobs_table([{"job_id": "j1", "status": "RUNNING", "dag_id": "d\x07"}])
    assert "\x07" not in table and "d\\x07" in table


def test_jobs_stop_goes_through_airflows_confirmation_and_names_who_asked(
    sidecar: SidecarProcess, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(sidecar, "sleep 600", "to-stop", airflow)
    code, said = run(sidecar, "jobs", "stop", job_id, "--reason", "runaway", monkeypatch=monkeypatch)
    assert code == 1 and said.startswith("kept: Airflow still wants this task instance")
    assert run(sidecar, "--json", "jobs", "show", job_id, monkeypatch=monkeypatch)[1].count('"RUNNING"')

    # Only the confirmation's direct read sees the mark: the loop's next poll cannot stop it first.
    airflow.mark_before_the_poll_sees_it(("cli", "manual__1", "to-stop", -1), "failed")
    code, said = run(sidecar, "jobs", "stop", job_id, "--reason", "runaway", monkeypatch=monkeypatch)
    assert code == 0 and said.split(":")[0] in ("stopped", "stop_requested"), said
    code, shown = run(sidecar, "jobs", "show", job_id, monkeypatch=monkeypatch)
    assert "RUNNING -> STOPPING" in shown and "runaway (asked by " in shown


def test_agents_list_drain_and_undrain(sidecar: SidecarProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    wait_until(lambda: "live" in run(sidecar, "agents", "list", monkeypatch=monkeypatch)[1], timeout=20,
               what="agent-1 live")  # fmt: skip
    code, table = run(sidecar, "agents", "list", monkeypatch=monkeypatch)
    assert code == 0 and table.splitlines()[1].split()[:2] == ["agent-1", "live"]
    code, drained = run(sidecar, "--json", "agents", "drain", "agent-1", monkeypatch=monkeypatch)
    assert code == 0 and json.loads(drained)["draining"] is True
    code, undrained = run(sidecar, "--json", "agents", "undrain", "agent-1", monkeypatch=monkeypatch)
    assert code == 0 and json.loads(undrained)["draining"] is False
    assert run(sidecar, "agents", "drain", "no-such-agent", monkeypatch=monkeypatch)[0] == 3


def test_a_forced_stop_needs_no_confirmation_and_the_audit_trail_says_so(
    sidecar: SidecarProcess, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(sidecar, "sleep 600", "forced", airflow)
    stop = ["jobs", "stop", job_id, "--reason", "disk full", "--force"]
    code, said = run(sidecar, *stop, monkeypatch=monkeypatch)
    assert code == 0 and said.split(":")[0] in ("stopped", "stop_requested"), said
    show = ["--json", "jobs", "show", job_id]
    wait_until(lambda: '"FAILED"' in run(sidecar, *show, monkeypatch=monkeypatch)[1], timeout=20)
    shown = run(sidecar, "jobs", "show", job_id, monkeypatch=monkeypatch)[1]
    assert "stopped by hand, without Airflow's confirmation: disk full (asked by " in shown
    assert "agentic jobs stop --force" in shown


def test_jobs_list_filters_by_agent_and_age_newest_first(
    sidecar: SidecarProcess, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    older = submit(sidecar, "true", "filtered-older", airflow)
    time.sleep(0.05)
    newer = submit(sidecar, "true", "filtered-newer", airflow)
    code, text = run(
        sidecar, "--json", "jobs", "list", "--agent", "agent-1", "--since", "10m", monkeypatch=monkeypatch
    )
    ids = [job["job_id"] for job in json.loads(text)]
    assert code == 0 and ids.index(newer) < ids.index(older)  # newest first
    code, text = run(sidecar, "--json", "jobs", "list", "--agent", "no-such-agent", monkeypatch=monkeypatch)
    assert code == 0 and json.loads(text) == []
    code, text = run(
        sidecar, "--json", "jobs", "list", "--since", "2999-01-01T00:00:00Z", monkeypatch=monkeypatch
    )
    assert code == 0 and json.loads(text) == []
    assert run(sidecar, "jobs", "list", "--since", "yesterday", monkeypatch=monkeypatch)[0] == 2


@pytest.mark.fast
def test_global_options_parse_before_or_after_the_subcommand() -> None:
    """``agentic jobs list --json`` as people type it, ``agentic --json jobs list`` as before."""
    given = ("--json", "--ca-file", "ca.pem", "--url", "https://s", "--token-file", "t")
    for argv in (
        [*given, "jobs", "list"],
        ["jobs", "list", *given],
        [*given[:3], "jobs", "list", *given[3:]],
        ["agents", "drain", *given[:1], "vm-1", *given[1:]],  # between its arguments too
    ):
        args = parser().parse_args(argv)
        seen = (args.json, args.ca_file, args.url, args.token_file)
        assert seen == (True, "ca.pem", "https://s", "t"), argv
    plain = parser().parse_args(["jobs", "show", "j1"])
    assert (plain.json, plain.ca_file, plain.url, plain.token_file) == (False, None, None, None)
    # The one nearest the end wins, as for any repeated option.
    assert parser().parse_args(["--url", "http://a", "jobs", "list", "--url", "http://b"]).url == "http://b"


def test_global_options_after_the_subcommand_reach_the_sidecar(
    sidecar: SidecarProcess, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    job_id = submit(sidecar, "echo placed", "placed", airflow)
    for argv in (["--json", "jobs", "list", "--dag", "cli"], ["jobs", "list", "--dag", "cli", "--json"]):
        code, text = run(sidecar, *argv, monkeypatch=monkeypatch)
        assert code == 0 and job_id in [j["job_id"] for j in json.loads(text)], argv
    code, text = run(sidecar, "jobs", "show", job_id, "--json", monkeypatch=monkeypatch)
    assert code == 0 and json.loads(text)["job"]["job_id"] == job_id
    code, text = run(sidecar, "agents", "list", "--json", monkeypatch=monkeypatch)
    assert code == 0 and "agent-1" in [a["agent_id"] for a in json.loads(text)]
    # --url and --token-file after the subcommand take over from the environment, as before it.
    token_file = tmp_path / "token"
    token_file.write_text(sidecar.token + "\n")
    monkeypatch.setenv("AGENTIC_SIDECAR_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AGENTIC_TOKEN", "wrong")
    out = io.StringIO()
    argv = ["jobs", "list", "--dag", "cli", "--url", sidecar.url, "--token-file", str(token_file), "--json"]
    assert main(argv, out=out) == 0 and job_id in [j["job_id"] for j in json.loads(out.getvalue())]


def test_an_https_sidecar_signed_by_a_private_ca_asks_for_ca_file(tmp_path: Path) -> None:
    """Without the CA the CLI says the certificate did not verify and how to pass the CA: one line,
    no traceback, no token; with it (flag after the subcommand, or its variable) the same call works."""
    ca = make_ca(tmp_path / "ca", "Private CA")
    other = make_ca(tmp_path / "other", "Other CA")
    server = ca.issue(tmp_path / "server", hosts=["127.0.0.1"])
    with SidecarProcess(
        workdir=tmp_path / "sidecar", airflow_url=f"http://127.0.0.1:{free_port()}",
        airflow_password="unused", agents=[], tls_cert_file=server.cert_file,
        tls_key_file=server.key_file, ca_file=ca.cert_file,
    ) as sidecar:  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTIC_", "SSL_CERT_"))}
        env.update(AGENTIC_SIDECAR_URL=sidecar.url, AGENTIC_TOKEN=sidecar.token)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "agentic_cli", *args],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        done = cli("jobs", "list")
        said = done.stderr
        assert done.returncode == 4 and done.stdout == "", said
        assert "certificate verify failed" in said and "--ca-file" in said and "AGENTIC_CA_FILE" in said
        assert "Traceback" not in said and len(said.splitlines()) == 1, said
        assert sidecar.token not in said

        wrong = cli("jobs", "list", "--ca-file", str(other.cert_file))
        assert wrong.returncode == 4 and "certificate verify failed" in wrong.stderr
        assert str(other.cert_file) in wrong.stderr and "Traceback" not in wrong.stderr

        by_name = sidecar.url.replace("127.0.0.1", "localhost")  # a name the certificate does not hold
        mismatch = cli("jobs", "list", "--ca-file", str(ca.cert_file), "--url", by_name)
        assert mismatch.returncode == 4 and "certificate does not name the host" in mismatch.stderr

        assert cli("jobs", "list", "--ca-file", str(ca.cert_file)).returncode == 0
        env["AGENTIC_CA_FILE"] = str(ca.cert_file)
        listed = cli("agents", "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
