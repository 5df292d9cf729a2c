"""Schemathesis against both services: whatever request docs/openapi-agent.yaml and
docs/openapi-sidecar.yaml allow, or nearly allow, gets an answer the document describes.

Every operation gets its documented examples, the boundary values of every bound (the coverage phase:
just inside and just outside each bound, missing and wrong-typed fields, undeclared methods) and
:data:`MAX_EXAMPLES` random requests, valid and invalid, from a fixed seed. Every answer goes through
every check Schemathesis has: no 5xx, a documented status, content type, headers and body, valid
input accepted and invalid input refused, auth enforced (the request again without and with a wrong
token), 405 with `Allow` for undeclared methods, and a response time bound.

The services are real processes on 127.0.0.1: an agent, and a sidecar routing to it, with Airflow
played by bench/standins.py (it knows no task instance, so the reconciler stops whatever the
generated submissions start). Ports and tokens are chosen at import, so the schemas are aimed at
this machine before a request is generated.

Both services run ``command`` under /bin/sh: whatever is generated, a command that would run is
replaced with ``true`` just before it is sent (:func:`fit_to_this_machine`), and so is anything
naming what only this machine has (a directory, a user, an agent). Text holding NUL is never
generated: both services refuse it anywhere in a body or query, which no schema can say of every key
of an open object; tests/test_openapi.py pins those refusals, and the ones of names that do not exist.
"""

from __future__ import annotations

import json
import os
import pwd
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings

from bench.standins import AirflowStandIn, recorded_task_instance
from harness.agent import AgentProcess
from harness.processes import free_port
from harness.served import ServedApp
from harness.sidecar import AgentRef, SidecarProcess

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Random requests per operation, on top of its examples and boundary values: about 20 s for both
# services on a 2-core machine (300, with other seeds too, found nothing more in a minute).
MAX_EXAMPLES = 50
LOOPBACK = "http://127.0.0.1:"
AGENT_PORT, SIDECAR_PORT = free_port(), free_port()
AGENT_TOKEN, SIDECAR_TOKEN = "contract-agent-token", "contract-sidecar-token"
AGENT_ID = "agent-1"
SIDECAR_COMMAND_BYTES = yaml.safe_load((DOCS / "openapi-sidecar.yaml").read_text(encoding="utf-8"))[
    "components"
]["schemas"]["SubmitRequest"]["properties"]["command"]["maxLength"]


def contract(document: str, port: int, auth: dict[str, dict[str, str]]) -> Any:
    """The document as a Schemathesis schema aimed at 127.0.0.1:``port``, with every check on."""
    config = schemathesis.Config.from_dict(
        {
            "base-url": f"{LOOPBACK}{port}",
            "seed": 20260,  # the same requests on every run: a failure here fails the same way again
            "request-timeout": 30,
            "generation": {"max-examples": MAX_EXAMPLES, "allow-x00": False},
            # Every check is on by default; the response time bound only once it has a limit.
            "checks": {"max_response_time": 20},
            "auth": {"openapi": auth},
        }
    )
    return schemathesis.openapi.from_path(DOCS / document, config=config)


CONTRACT_SETTINGS = settings(
    deadline=None,  # a POST /run starts a supervisor process: slow on a busy machine, and not a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,  # nothing written under .hypothesis/: the seed reproduces a failure
)
ANSWERS: Counter[tuple[str, str, int]] = Counter()  # (service, operation, status) -> answers seen


# ------------------------------------------------------------------------ what generated requests do


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    base_url = kwargs.get("base_url") or case.operation.base_url or ""
    assert base_url.startswith(LOOPBACK), f"{case.operation.label} aimed at {base_url!r}"
    # The sidecar refuses a longer command before any agent sees it; the agent would run it.
    longest = SIDECAR_COMMAND_BYTES if case.operation.label == "POST /jobs" else None
    fit_to_this_machine(case.body, longest_command=longest)


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: Any) -> None:
    service = "agent" if case.operation.base_url.endswith(f":{AGENT_PORT}") else "sidecar"
    ANSWERS[(service, case.operation.label, response.status_code)] += 1


def fit_to_this_machine(body: object, *, longest_command: int | None = None) -> None:
    """Make, in place, a job in ``body`` (POST /run's ``payload``, POST /jobs' top level) harmless and
    naming only what exists here.

    A command that would run becomes ``true``. What a document can describe but not enumerate (an
    existing directory, a user of this machine, a configured agent, labels an agent carries) becomes
    one that exists. Values the service refuses anyway (blank, the wrong type, a relative cwd, a
    command over ``longest_command`` bytes) stay as generated: those requests run nothing.
    """
    if not isinstance(body, dict):
        return
    for job in (body, body.get("payload")):
        if not isinstance(job, dict):
            continue
        command = job.get("command")
        if (
            longest_command is not None
            and isinstance(command, str)
            and len(command.encode("utf-8", "surrogatepass")) > longest_command
        ):
            continue  # refused whole (400)
        for key, (acted_on, existing) in EXISTING.items():
            if key in job and acted_on(job[key]):
                job[key] = existing


def _strings(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)


# What each service acts on rather than refuses (as the agent and the sidecar parse it), and what
# exists here to put in its place.
EXISTING: dict[str, tuple[Callable[[object], bool], object]] = {
    "command": (lambda v: isinstance(v, str) and bool(v.strip()), "true"),
    "cwd": (lambda v: isinstance(v, str) and v.startswith("/"), "/tmp"),
    # run_as needs an agent running as root (it is, in CI); otherwise no user switch at all.
    "run_as": (
        lambda v: isinstance(v, str) and bool(v),
        pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None,
    ),
    "agent_id": (lambda v: isinstance(v, str), AGENT_ID),
    "labels": (_strings, ["default"]),
}


@pytest.mark.fast
def test_generated_jobs_are_made_harmless_and_name_only_what_exists() -> None:
    run = {"job_id": "j", "payload": {"command": "rm -rf ~", "cwd": "/etc", "env": {"A": "1"}}}
    fit_to_this_machine(run)
    assert run == {"job_id": "j", "payload": {"command": "true", "cwd": "/tmp", "env": {"A": "1"}}}
    submit = {"command": "reboot", "agent_id": "", "labels": ["gpu"], "dag_id": "d"}
    fit_to_this_machine(submit, longest_command=SIDECAR_COMMAND_BYTES)
    assert submit == {"command": "true", "agent_id": AGENT_ID, "labels": ["default"], "dag_id": "d"}
    odd = {"command": "\x85", "cwd": "tmp", "run_as": "\x85", "labels": [1], "payload": {"command": None}}
    fit_to_this_machine(odd)  # \x85 is white space to str.strip(), and a user name to getpwnam()
    assert odd == {
        "command": "\x85",
        "cwd": "tmp",
        "run_as": EXISTING["run_as"][1],
        "labels": [1],
        "payload": {"command": None},
    }
    too_long = {"command": "x" * (SIDECAR_COMMAND_BYTES + 1), "cwd": "/"}
    fit_to_this_machine(too_long, longest_command=SIDECAR_COMMAND_BYTES)
    assert too_long == {"command": "x" * (SIDECAR_COMMAND_BYTES + 1), "cwd": "/"}


# ------------------------------------------------------------------------------------------ agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    home = tmp_path_factory.mktemp("agent")
    # run_as is mapped to the agent's own user (root in CI), which [agent] run_as_users must name.
    allowed = f"run_as_users = {json.dumps(['*', pwd.getpwuid(os.geteuid()).pw_name])}\n"
    with AgentProcess(
        home, token=AGENT_TOKEN, agent_id=AGENT_ID, port=AGENT_PORT, extra_config=allowed
    ) as proc:
        yield proc


agent_contract = contract(
    "openapi-agent.yaml",
    AGENT_PORT,
    {"bearer": {"bearer": AGENT_TOKEN}, "agentToken": {"api_key": AGENT_TOKEN}},
)


@agent_contract.parametrize()
@CONTRACT_SETTINGS
def test_the_agent_answers_as_documented(case: schemathesis.Case, agent: AgentProcess) -> None:
    case.call_and_validate()


# ---------------------------------------------------------------------------------------- sidecar


@pytest.fixture(scope="module")
def sidecar(agent: AgentProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    airflow = ServedApp(AirflowStandIn(template=recorded_task_instance()).app())
    airflow.start()
    try:
        with SidecarProcess(
            workdir=tmp_path_factory.mktemp("sidecar"),
            airflow_url=airflow.url,
            airflow_password="stand-in",
            agents=[AgentRef(AGENT_ID, agent.url, agent.token, labels=["default"])],
            api_version="v2",
            interval_seconds=0.5,
            port=SIDECAR_PORT,
            token=SIDECAR_TOKEN,
        ) as proc:
            yield proc
    finally:
        airflow.stop()


sidecar_contract = contract("openapi-sidecar.yaml", SIDECAR_PORT, {"bearer": {"bearer": SIDECAR_TOKEN}})


@sidecar_contract.parametrize()
@CONTRACT_SETTINGS
def test_the_sidecar_answers_as_documented(case: schemathesis.Case, sidecar: SidecarProcess) -> None:
    case.call_and_validate()


# ------------------------------------------------------------------------------------------- last


def test_generated_requests_reached_every_operation_past_auth() -> None:
    """The checks above say nothing if every request was turned away at the door (a token the
    services do not take is a documented 401): each operation answered something else too, and each
    service accepted some requests. Runs after the contract tests of this module."""
    assert ANSWERS, "run this module whole: the contract tests above record what they were answered"
    past_auth = {(s, op) for (s, op, status), _ in ANSWERS.items() if status not in (401, 405)}
    every = {(s, op) for s, op, _ in ANSWERS}
    assert every <= past_auth, f"only 401 or 405 from {sorted(every - past_auth)}"
    accepted = {s for s, _, status in ANSWERS if 200 <= status < 300}
    assert accepted == {s for s, _ in every}, f"no 2xx at all from {sorted({s for s, _ in every} - accepted)}"
