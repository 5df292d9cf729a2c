"""The provider as Airflow itself sees it, in the real Airflow 3.3.2, 3.1.8 and 2.11.2 venvs.

No Airflow server starts: each test runs a short script in a cached venv (harness.airflow.ensure_venv)
with this checkout installed into a directory put first on its path, and reads back what it printed.
What is checked: the connection type ``agentic_run`` with its form (3.2+ read it from provider info,
3.0-3.1 and 2 from the hook), connections in every documented form, connections Airflow cannot load
(named with Airflow's error, not as missing), the "Agentic job" link, and,
against a real sidecar (its Airflow the stand-in of ``bench.standins``, which says what each task
instance's state is), the hook's calls and the optional callbacks with their XCom audit trail.

The task instances handed to the callbacks and the link's XCom read are stand-ins (no Airflow database
here); tests/test_airflow_e2e.py reads the link from a real Airflow's REST API.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentic_airflow.provider import CONN_FIELDS, UI_FIELD_BEHAVIOUR
from harness.agent import AgentProcess
from harness.airflow import AIRFLOW_2_VERSION, AIRFLOW_3_1_VERSION, AIRFLOW_VERSION, ensure_venv
from harness.processes import free_port
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cr3t-sidecar-token"


@dataclass(frozen=True)
class Venv:
    """A cached Airflow venv. (Not a bare version string: tests/conftest.py marks a test given
    Airflow 2's version postgres, for the Airflow servers it starts; these start none.)"""

    version: str

    def __str__(self) -> str:
        return f"airflow-{self.version}"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


AIRFLOW_3, AIRFLOW_3_1, AIRFLOW_2 = Venv(AIRFLOW_VERSION), Venv(AIRFLOW_3_1_VERSION), Venv(AIRFLOW_2_VERSION)

PRELUDE = """
import json
def emit(value):
    print("RESULT " + json.dumps(value, default=str))

def metadata_db():
    # Airflow 2 reads connections from its metadata DB after the environment, as a worker does: give
    # it one that holds none (without it, that read fails, and a connection is not "not defined").
    import airflow
    if airflow.__version__.startswith("2."):
        from airflow import settings
        from airflow.models.connection import Connection
        Connection.__table__.create(settings.engine, checkfirst=True)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout, installed once for every venv of the module (pure Python, same interpreter)."""
    target = tmp_path_factory.mktemp("provider-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return target


def run_in(venv: Venv, site: Path, home: Path, script: str, env: dict[str, str] | None = None) -> Any:
    """Run ``script`` in ``venv``'s Python with this package first on its path; what it ``emit``-ted."""
    python = ensure_venv(venv.version) / "bin" / "python"
    home.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(python), "-c", PRELUDE + script],
        env={"PYTHONPATH": str(site), "AIRFLOW_HOME": str(home), "PATH": "/usr/bin:/bin", **(env or {})},
        cwd=home,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


# --- the connection type and its form ----------------------------------------------------------------

FORM = """
from agentic_airflow.hooks import AgenticRunHook
from airflow.providers_manager import ProvidersManager

def standard(name, field):
    return {"hidden": field["hidden"], "title": field["title"], "placeholder": field["placeholder"]}

try:
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
except ImportError:  # Airflow 2: the webserver's form, from the hook's widgets
    manager = ProvidersManager()
    behaviour = manager.field_behaviours["agentic_run"]
    prefix = "extra__agentic_run__"
    extras = {}
    for key, widget in manager.connection_form_widgets.items():
        if key.startswith(prefix):
            field = widget.field
            choices = [v.values for v in field.kwargs["validators"] if type(v).__name__ == "AnyOf"]
            extras[widget.field_name] = {
                "label": str(field.args[0]),
                "help": field.kwargs["description"],
                "enum": choices[0] if choices else None,
            }
    form = {
        "hidden": sorted(behaviour["hidden_fields"]),
        "titles": behaviour["relabeling"],
        "placeholders": {k.removeprefix(prefix): v for k, v in behaviour["placeholders"].items()},
        "extras": extras,
    }
else:  # Airflow 3: what the API serves the React form
    (meta,) = [m.model_dump() for m in HookMetaService.hook_meta_data() if m.connection_type == "agentic_run"]
    fields = {("schema" if k == "url_schema" else k): v for k, v in meta["standard_fields"].items() if v}
    form = {
        "hidden": sorted(k for k, v in fields.items() if v["hidden"]),
        "titles": {k: v["title"] for k, v in fields.items() if v["title"]},
        "placeholders": {k: v["placeholder"] for k, v in fields.items() if v["placeholder"]},
        "extras": {
            name: {"label": f["schema"]["title"], "help": f["description"], "enum": f["schema"].get("enum")}
            for name, f in meta["extra_fields"].items()
        },
    }

hook = ProvidersManager().hooks["agentic_run"]
behaviour = AgenticRunHook.get_ui_field_behaviour()
behaviour["relabeling"]["password"] = "changed"  # a copy: the next call is unchanged
emit({
    "form": form,
    "hook": [
        hook.hook_class_name, hook.connection_id_attribute_name, hook.hook_name, hook.connection_testable
    ],
    "behaviour": AgenticRunHook.get_ui_field_behaviour(),
    "links": ProvidersManager().extra_links_class_names,
})
"""


@pytest.mark.parametrize("venv", [AIRFLOW_3, AIRFLOW_3_1, AIRFLOW_2], ids=str)
def test_airflow_offers_the_agentic_run_connection_form(venv: Venv, site: Path, tmp_path: Path) -> None:
    found = run_in(venv, site, tmp_path, FORM)
    assert found["hook"] == [
        "agentic_airflow.hooks.AgenticRunHook",
        "agentic_conn_id",
        "Agentic Run (sidecar)",
        True,
    ]
    assert "agentic_airflow.links.AgenticJobLink" in found["links"]
    assert found["behaviour"] == UI_FIELD_BEHAVIOUR
    form = found["form"]
    assert form["hidden"] == ["login", "schema"]
    assert form["titles"] == {"password": "Token"}
    declared = {name: [field["label"], field["description"]] for name, field in CONN_FIELDS.items()}
    assert {name: [field["label"], field["help"]] for name, field in form["extras"].items()} == declared
    assert form["extras"]["scheme"]["enum"] == ["http", "https"]
    placeholders = UI_FIELD_BEHAVIOUR["placeholders"]
    if venv.major == 3:  # the React form's placeholders are the standard fields' only
        placeholders = {name: text for name, text in placeholders.items() if name not in CONN_FIELDS}
    assert form["placeholders"] == placeholders
    assert form["placeholders"]["password"] == "the sidecar's token"


# --- connections in every documented form ------------------------------------------------------------

CONNECTIONS = """
import os
from agentic_airflow.hooks import AgenticRunHook
from agentic_airflow.sidecar_client import SidecarError

metadata_db()
found = {}
prefix = "AIRFLOW_CONN_"
for conn_id in sorted(k.removeprefix(prefix).lower() for k in os.environ if k.startswith(prefix)):
    hook = AgenticRunHook(conn_id)
    endpoint = hook.get_endpoint()
    conn = hook.get_connection(conn_id)
    resolved = conn.get_hook() if conn.conn_type == "agentic_run" else None  # what Airflow builds
    found[conn_id] = {
        "conn_type": conn.conn_type,
        "base_url": endpoint.base_url,
        "ca_file": endpoint.ca_file,
        "token": endpoint.token == os.environ["EXPECTED_TOKEN"],
        "hook": [type(resolved).__name__, getattr(resolved, "agentic_conn_id", None)],
        "repr": repr(endpoint),
    }
try:
    AgenticRunHook("undefined").get_endpoint()
except SidecarError as exc:
    found["undefined"] = str(exc)
emit(found)
"""


def documented_connections() -> list[str]:
    """Every ``AIRFLOW_CONN_AGENTIC_RUN_DEFAULT='...'`` example of docs/provider.md, as written."""
    text = (ROOT / "docs" / "provider.md").read_text(encoding="utf-8")
    return re.findall(r"AIRFLOW_CONN_AGENTIC_RUN_DEFAULT='([^']+)'", text)


@pytest.mark.parametrize("venv", [AIRFLOW_3, AIRFLOW_2], ids=str)
def test_airflow_reads_every_documented_connection_form(venv: Venv, site: Path, tmp_path: Path) -> None:
    documented = documented_connections()
    assert len(documented) >= 3, documented  # the URI and JSON forms of agentic_run, and http
    env = {f"AIRFLOW_CONN_DOC_{i}": doc.replace("<token>", TOKEN) for i, doc in enumerate(documented)}
    env["EXPECTED_TOKEN"] = TOKEN
    found = run_in(venv, site, tmp_path, CONNECTIONS, env)
    assert found.pop("undefined") == "the connection undefined is not defined"
    by_type: dict[str, list[dict[str, Any]]] = {}
    for conn in found.values():
        assert conn["token"] and TOKEN not in conn["repr"]
        by_type.setdefault(conn["conn_type"], []).append(conn)
    agentic = by_type.pop("agentic_run")
    assert len(agentic) >= 2  # the URI and the JSON form say the same
    for conn_id, conn in found.items():
        if conn in agentic:
            assert conn["hook"] == ["AgenticRunHook", conn_id]  # Airflow builds the hook for the type
            assert conn["base_url"] == "https://sidecar-host:8790/agentic"
            assert conn["ca_file"] == "/etc/ssl/agentic/ca.pem"
    (http,) = by_type.pop("http")  # the older form keeps working
    assert (http["base_url"], http["ca_file"]) == ("http://sidecar-host:8790", "")
    assert not by_type


# --- a connection Airflow cannot load -------------------------------------------------------------------

UNLOADABLE = """
import asyncio
import os
from functools import partial
from types import SimpleNamespace

from agentic_airflow import operators
from agentic_airflow.connection import aget_endpoint
from agentic_airflow.hooks import AgenticRunHook
from agentic_airflow.operators import AgenticRunOperator
from agentic_airflow.polling import submit_patiently
from agentic_airflow.sidecar_client import SidecarError
from agentic_airflow.triggers import AgenticJobTrigger

if os.environ.get("CRYPTOGRAPHY_51"):
    # cryptography 51's MultiFernet, a Rust class: Airflow before 3.2 cannot set its `is_encrypted`
    # on it, so with a fernet key set every connection with a password fails to load.
    import cryptography.fernet

    PythonMultiFernet = cryptography.fernet.MultiFernet

    class MultiFernet:
        __slots__ = ("_fernet",)

        def __init__(self, fernets):
            self._fernet = PythonMultiFernet(fernets)

        def encrypt(self, data):
            return self._fernet.encrypt(data)

        def decrypt(self, token, ttl=None):
            return self._fernet.decrypt(token, ttl)

    cryptography.fernet.MultiFernet = MultiFernet

metadata_db()


class Log:
    # What the trigger writes to the task's log, whatever logger Airflow gives it.
    def __init__(self):
        self.lines = []

    def _line(self, msg, *args, **kwargs):
        self.lines.append(msg % args if args else msg)

    debug = info = warning = error = exception = _line


def error_of(call):
    try:
        call()
    except SidecarError as exc:
        return str(exc)
    return None


async def trigger_log(conn_id):
    trigger = AgenticJobTrigger("4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8", conn_id, poll_interval=0.1)
    trigger._log = log = Log()  # LoggingMixin's: Airflow 3 would give a structlog logger
    try:
        await asyncio.wait_for(trigger.run().__anext__(), 1.5)  # it waits: the connection may be fixed
    except asyncio.TimeoutError:
        pass
    return log.lines


# The operator's submission without its 10 minutes of patience.
operators.submit_patiently = partial(submit_patiently, patience=0.0)
ti = SimpleNamespace(
    dag_id="d", task_id="t", run_id="r", map_index=-1, try_number=1, id="ti", start_date=None,
    xcom_push=lambda **kwargs: None,
)
found = {}
for conn_id in os.environ["CONN_IDS"].split(","):
    hook = AgenticRunHook(conn_id)
    found[conn_id] = {
        "hook": error_of(hook.get_endpoint),
        "test": hook.test_connection(),
        "trigger": error_of(lambda: asyncio.run(aget_endpoint(conn_id))),
        "operator": error_of(
            lambda: AgenticRunOperator(task_id="t", command="true", conn_id=conn_id).execute({"ti": ti})
        ),
        "trigger_log": asyncio.run(trigger_log(conn_id)),
    }
emit(found)
"""

# Connections Airflow refuses to parse, and the start of its error (each version words it so).
UNLOADABLE_CONNECTIONS = {
    "agentic_bad_port": (f"agentic-run://:{TOKEN}@sidecar-host:eighty", "ValueError: Port could not be cast"),
    # The scheme after the credentials: Airflow's error quotes the whole URI, token included.
    "agentic_bad_uri": (
        f"agentic-run://:{TOKEN}@https://sidecar-host:8790",
        "AirflowException: Invalid connection string: agentic-run://***@https://sidecar-host:8790",
    ),
    "agentic_bad_json": (
        json.dumps({"conn_type": "agentic_run", "host": "sidecar-host", "port": "eighty", "password": TOKEN}),
        "ValueError: Expected integer value for `port`, but got 'eighty' instead.",
    ),
}


def unloadable(venv: Venv, site: Path, home: Path, values: dict[str, str], **env: str) -> dict[str, Any]:
    """What the hook, the form's Test button, the trigger and the operator say of each connection of
    ``values`` (set as ``AIRFLOW_CONN_*``) and of one that is not defined."""
    env |= {f"AIRFLOW_CONN_{conn_id.upper()}": value for conn_id, value in values.items()}
    env["CONN_IDS"] = ",".join([*values, "undefined"])
    found: dict[str, Any] = run_in(venv, site, home, UNLOADABLE, env)
    assert TOKEN not in json.dumps(found)
    undefined = found.pop("undefined")
    assert undefined["hook"] == undefined["trigger"] == "the connection undefined is not defined"
    assert undefined["test"] == [False, "the connection undefined is not defined"]
    return found


def assert_named(conn_id: str, seen: dict[str, Any], airflows_error: str) -> None:
    loaded = f"the connection {conn_id} could not be loaded: {airflows_error}"
    where = f"(read by Airflow's EnvironmentVariablesBackend from AIRFLOW_CONN_{conn_id.upper()})"
    assert seen["hook"].startswith(loaded) and seen["hook"].endswith(where), seen["hook"]
    assert seen["test"] == [False, seen["hook"]]
    assert seen["trigger"] == seen["hook"]
    assert seen["operator"].startswith(f"connection {conn_id}: {seen['hook']}; still failing after")
    # The trigger keeps waiting, as for any trouble reading the connection, and says why.
    line = f"cannot use the connection {conn_id} ({seen['hook']}); retrying in"
    assert any(line in logged for logged in seen["trigger_log"]), seen["trigger_log"]
    assert "not defined" not in json.dumps(seen)


@pytest.mark.parametrize("venv", [AIRFLOW_3, AIRFLOW_3_1, AIRFLOW_2], ids=str)
def test_a_connection_airflow_cannot_parse_is_named_with_airflows_error_never_the_token(
    venv: Venv, site: Path, tmp_path: Path
) -> None:
    values = {conn_id: value for conn_id, (value, _) in UNLOADABLE_CONNECTIONS.items()}
    found = unloadable(venv, site, tmp_path, values)
    for conn_id, (_, airflows_error) in UNLOADABLE_CONNECTIONS.items():
        assert_named(conn_id, found[conn_id], airflows_error)


@pytest.mark.parametrize("venv", [AIRFLOW_3_1, AIRFLOW_2], ids=str)
def test_a_fernet_airflow_cannot_build_is_named_not_taken_for_a_missing_connection(
    venv: Venv, site: Path, tmp_path: Path
) -> None:
    values = {"agentic_run_default": f"agentic-run://:{TOKEN}@sidecar-host:8790"}
    fernet_key = base64.urlsafe_b64encode(b"agentic-provider-test-fernet-key").decode()  # 32 bytes
    env = {"CRYPTOGRAPHY_51": "1", "AIRFLOW__CORE__FERNET_KEY": fernet_key}
    found = unloadable(venv, site, tmp_path, values, **env)
    error = "AttributeError: 'MultiFernet' object has no attribute 'is_encrypted'"
    assert_named("agentic_run_default", found["agentic_run_default"], error)


# --- the extra link ------------------------------------------------------------------------------------

LINK = """
from datetime import datetime
from types import SimpleNamespace
from unittest import mock

from agentic_airflow import links
from agentic_airflow.links import AgenticJobLink
from agentic_airflow.operators import AgenticRunOperator

try:
    from airflow.sdk import DAG
except ImportError:
    from airflow import DAG
try:
    from airflow.serialization.serialized_objects import DagSerialization as Serialization
except ImportError:
    from airflow.serialization.serialized_objects import SerializedDAG as Serialization

JOB = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"
key = SimpleNamespace(dag_id="links", task_id="run", run_id="r", map_index=-1, try_number=1)
with DAG("links", schedule=None, start_date=datetime(2024, 1, 1)) as dag:
    op = AgenticRunOperator(task_id="run", command="true", conn_id="agentic_proxy")
    undefined = AgenticRunOperator(task_id="undefined", command="true", conn_id="nowhere")
(link,) = op.operator_extra_links
found = {"name": link.name, "type": type(link).__name__}

def link_for(operator, **xcom):
    with mock.patch.object(links.XCom, "get_value", **xcom) as get_value:
        url = link.get_link(operator, ti_key=key)
    found.setdefault("asked", get_value.call_args.kwargs if get_value.call_args else None)
    return url

found["link"] = link_for(op, return_value=JOB)
found["before_submission"] = link_for(op, return_value=None)
found["undefined_connection"] = link_for(undefined, return_value=JOB)
found["xcom_failing"] = link_for(op, side_effect=RuntimeError("postgresql://user:pw@db unavailable"))
restored = Serialization.from_dict(Serialization.to_dict(dag)).get_task("run")
found["restored_links"] = list(restored.extra_links)
found["serialized_task"] = link_for(restored, return_value=JOB)  # what Airflow 2's webserver hands in
found["no_userinfo"] = links.job_url("https://user:pw@proxy.example:8443/agentic", JOB)
emit(found)
"""


@pytest.mark.parametrize("venv", [AIRFLOW_3, AIRFLOW_2], ids=str)
def test_the_link_points_at_the_job_in_the_operators_sidecar_and_never_raises(
    venv: Venv, site: Path, tmp_path: Path
) -> None:
    env = {
        "AIRFLOW_CONN_AGENTIC_PROXY": f"agentic-run://:{TOKEN}@proxy.example:443?base_path=/agentic&scheme=https",
        "AIRFLOW_CONN_AGENTIC_RUN_DEFAULT": "http://sidecar-host:8790",  # no token: a link needs none
    }
    found = run_in(venv, site, tmp_path, LINK, env)
    job = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"
    assert (found["name"], found["type"]) == ("Agentic job", "AgenticJobLink")
    assert found["asked"]["key"] == "agentic_job_id"
    assert found["link"] == f"https://proxy.example:443/agentic/ui/jobs/{job}"
    assert found["before_submission"] == found["undefined_connection"] == found["xcom_failing"] == ""
    assert found["restored_links"] == ["Agentic job"]  # Airflow 2 restores it only as a registered link
    # The serialized task keeps its conn_id (a template field): its own sidecar, not the default's.
    assert found["serialized_task"] == found["link"]
    assert found["no_userinfo"] == f"https://proxy.example:8443/agentic/ui/jobs/{job}"  # no credentials shown


# --- against a real sidecar ----------------------------------------------------------------------------


@dataclass
class Stack:
    airflow: ServedAirflow
    sidecar: SidecarProcess

    def submit(self, dag_id: str, task_id: str, state: str) -> str:
        """A running job for a task instance the stand-in Airflow shows in ``state``."""
        # On the stand-in's own loop, as the sidecar's reads are served there (mark() does the same).
        self.airflow.call_soon(self.airflow.standin.add, dag_id, "r", task_id, -1, "running", 1)
        body = {"command": "sleep 120", "agent_id": "agent-1", "dag_id": dag_id, "task_id": task_id}
        with self.sidecar.client() as client:
            answer = client.post("/jobs", json={**body, "run_id": "r", "map_index": -1, "try_number": 1})
        assert answer.status_code == 201, answer.text
        if state != "running":
            self.airflow.mark((dag_id, "r", task_id, -1), state)
        return str(answer.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        with self.sidecar.client() as client:
            return dict(client.get(f"/jobs/{job_id}").json())

    def stop_sources(self, job_id: str) -> list[str]:
        with self.sidecar.client() as client:
            events = client.get(f"/jobs/{job_id}/events").json()["events"]
        return [e["source"] for e in events if e["new_status"] == "STOPPING"]

    def env(self) -> dict[str, str]:
        url = f"127.0.0.1:{self.sidecar.port}"
        return {
            "AIRFLOW_CONN_AGENTIC_RUN_DEFAULT": f"agentic-run://:{self.sidecar.token}@{url}",
            "AIRFLOW_CONN_AGENTIC_BAD": f"agentic-run://:{TOKEN}@{url}",  # a token the sidecar refuses
            "AIRFLOW_CONN_AGENTIC_NOWHERE": f"agentic-run://:{TOKEN}@127.0.0.1:{free_port()}",
        }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("provider-sidecar")
    airflow = ServedAirflow()
    airflow.start()
    try:
        with (
            AgentProcess(home=base / "agent", agent_id="agent-1") as agent,
            SidecarProcess(
                workdir=base / "sidecar",
                airflow_url=airflow.url,
                airflow_password="unused",
                agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
                api_version="v2",
                # Only the callbacks' push can stop a job within these tests, never the poll.
                interval_seconds=300.0,
                full_resync_seconds=300.0,
            ) as sidecar,
        ):
            yield Stack(airflow, sidecar)
    finally:
        airflow.stop()


HOOK = """
import os
from agentic_airflow.hooks import AgenticRunHook
from agentic_airflow.sidecar_client import SidecarError

try:
    from airflow.sdk import BaseHook
except ImportError:
    from airflow.hooks.base import BaseHook

metadata_db()
found = {
    "default": AgenticRunHook().test_connection(),
    "button": BaseHook.get_connection("agentic_run_default").test_connection(),  # the form's Test
    "bad_token": AgenticRunHook("agentic_bad").test_connection(),
    "nowhere": AgenticRunHook("agentic_nowhere").test_connection(),
    "undefined": AgenticRunHook("undefined").test_connection(),
    "job": AgenticRunHook().get_job(os.environ["JOB_ID"]),
}
try:
    AgenticRunHook().get_job("0" * 32)
except SidecarError as exc:
    found["unknown_job"] = str(exc)
emit(found)
"""


@pytest.mark.parametrize("venv", [AIRFLOW_3, AIRFLOW_2], ids=str)
def test_the_hook_tests_its_connection_and_reads_jobs_from_the_real_sidecar(
    venv: Venv, site: Path, tmp_path: Path, stack: Stack
) -> None:
    job_id = stack.submit(f"hook_{venv.major}", "read", "running")
    found = run_in(venv, site, tmp_path, HOOK, {**stack.env(), "JOB_ID": job_id})
    where = f"sidecar at http://127.0.0.1:{stack.sidecar.port}"
    assert found["default"] == found["button"] == [True, f"{where} answered and accepted the token"]
    assert found["bad_token"] == [False, f"{where} refused the token (HTTP 401)"]
    assert found["nowhere"][0] is False and "unreachable: ConnectError" in found["nowhere"][1]
    assert found["undefined"] == [False, "the connection undefined is not defined"]
    assert (found["job"]["job_id"], found["job"]["status"]) == (job_id, "RUNNING")
    assert found["unknown_job"] == f"{where}: job not found: {'0' * 32}"
    assert TOKEN not in json.dumps(found) and stack.sidecar.token not in json.dumps(found)


CALLBACKS = """
import io
import logging
import os

from agentic_airflow.callbacks import (
    AgenticCallbackMixin,
    enable_router_callbacks,
    notify_router_on_failure,
    notify_router_on_retry,
)
from agentic_airflow.operators import AgenticRunOperator

try:
    from airflow.sdk import DAG
except ImportError:
    from airflow import DAG
try:
    from airflow.providers.standard.operators.empty import EmptyOperator
except ImportError:
    from airflow.operators.empty import EmptyOperator

captured = io.StringIO()
logging.getLogger("agentic_airflow").addHandler(logging.StreamHandler(captured))
logging.getLogger("agentic_airflow").setLevel(logging.INFO)
DAG_ID, JOBS = os.environ["DAG_ID"], dict(item.split("=") for item in os.environ["JOBS"].split(","))
ran = []

def user_failure(context):
    ran.append("user_failure")

def user_retry(context):
    ran.append("user_retry")


class TaskInstance:
    # What a callback's context holds as "ti", without Airflow's database: the pushes are recorded.
    def __init__(self, task_id, *, job_id=None, writable=True):
        self.dag_id, self.task_id, self.run_id, self.map_index, self.try_number = DAG_ID, task_id, "r", -1, 1
        self.job_id, self.writable, self.pushed, self.pulled = job_id, writable, {}, []

    def xcom_pull(self, task_ids=None, key=None, map_indexes=None, **kwargs):
        self.pulled.append([task_ids, key, map_indexes])
        return self.job_id if key == "agentic_job_id" else None

    def xcom_push(self, key, value, **kwargs):
        if not self.writable:
            raise RuntimeError("no XCom here")
        self.pushed[key] = value


class MyRun(AgenticCallbackMixin, AgenticRunOperator):
    pass


def fire(task, kind, ti):
    # As Airflow does: every callback of the list, in order.
    for callback in getattr(task, kind):
        callback({"ti": ti, "task_instance": ti, "task": task})
    return {"pushed": ti.pushed, "pulled": ti.pulled}


with DAG(DAG_ID, schedule=None, default_args={"on_retry_callback": user_retry}) as dag:
    run = MyRun(task_id="stopped", command="true", on_failure_callback=user_failure)
    bad = MyRun(task_id="refused", command="true", conn_id="agentic_bad")
    plain = AgenticRunOperator(task_id="plain", command="true", on_failure_callback=[user_failure])
    mapped = AgenticRunOperator.partial(task_id="mapped").expand(command=["a", "b"])
    other = EmptyOperator(task_id="other", on_failure_callback=user_failure)

def names(callbacks):  # Airflow 2 keeps a single callback as it was given
    listed = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []
    return [c.__name__ for c in listed]


found = {
    "mixin": [names(run.on_failure_callback), names(run.on_retry_callback)],
    "enabled": [enable_router_callbacks(dag), enable_router_callbacks(dag)],
    "plain": [names(plain.on_failure_callback), names(plain.on_retry_callback)],
    "mapped": [names(mapped.on_failure_callback), names(mapped.on_retry_callback)],
    "other": names(other.on_failure_callback),
    "stopped": fire(run, "on_failure_callback", TaskInstance("stopped", job_id=JOBS["stopped"])),
    "kept": fire(run, "on_failure_callback", TaskInstance("kept", job_id=JOBS["kept"])),
    "by_key": fire(run, "on_retry_callback", TaskInstance("by_key")),
    "refused": fire(bad, "on_failure_callback", TaskInstance("refused", job_id=JOBS["refused"])),
    "unwritable": fire(
        run, "on_failure_callback", TaskInstance("unwritable", job_id=JOBS["unwritable"], writable=False)
    ),
    "no_ti": notify_router_on_failure({}),
    "ran": ran,
}
notify_router_on_retry({"ti": object()})  # nothing usable: logged, never raised
found["log"] = captured.getvalue()
emit(found)
"""


@pytest.mark.parametrize("venv", [AIRFLOW_3, AIRFLOW_2], ids=str)
def test_callbacks_tell_the_real_sidecar_which_confirms_with_airflow_and_leave_an_audit_trail(
    venv: Venv, site: Path, tmp_path: Path, stack: Stack
) -> None:
    dag_id = f"callbacks_{venv.major}"
    states = {"stopped": "failed", "kept": "running", "by_key": "up_for_retry"}
    states |= {"refused": "failed", "unwritable": "failed"}
    jobs = {task_id: stack.submit(dag_id, task_id, state) for task_id, state in states.items()}
    env = {**stack.env(), "DAG_ID": dag_id, "JOBS": ",".join(f"{k}={v}" for k, v in jobs.items())}
    found = run_in(venv, site, tmp_path, CALLBACKS, env)

    # Installed after the task's own callbacks (its arguments, default_args), once, on agentic tasks only.
    ours = ["notify_router_on_failure", "notify_router_on_retry"]
    assert found["mixin"] == [["user_failure", ours[0]], ["user_retry", ours[1]]]
    assert found["enabled"] == [["stopped", "refused", "plain", "mapped"]] * 2
    assert found["plain"] == [["user_failure", ours[0]], ["user_retry", ours[1]]]
    assert found["mapped"] == [[ours[0]], ["user_retry", ours[1]]]
    assert found["other"] == ["user_failure"]
    assert found["ran"] == ["user_failure", "user_failure", "user_retry", "user_failure"]  # refused: none

    # Airflow says the task failed: the sidecar, having read that itself, stopped the job.
    stopped = found["stopped"]
    assert stopped["pulled"] == [["stopped", "agentic_job_id", -1]]
    notice = stopped["pushed"].pop("router_status_notification")
    assert (notice["action"], notice["job_id"], notice["status"]) == ("stopped", jobs["stopped"], "FAILED")
    assert stopped["pushed"] == {}  # agentic_job_id is in XCom already
    assert stack.job(jobs["stopped"])["status"] == "FAILED"
    assert stack.stop_sources(jobs["stopped"]) == ["api"]

    # Airflow still wants the task: the sidecar keeps the job, and says so.
    kept = found["kept"]["pushed"]["router_status_notification"]
    assert (kept["ok"], kept["action"]) == (False, "kept")
    assert stack.job(jobs["kept"])["status"] == "RUNNING"

    # No job id in XCom (the callback of a task that failed before its push): found by task instance.
    by_key = found["by_key"]["pushed"]
    assert by_key["agentic_job_id"] == jobs["by_key"]
    assert by_key["router_status_notification"]["action"] == "stopped"
    assert stack.job(jobs["by_key"])["status"] == "FAILED"

    # A refused token: the error is recorded, without the token; nothing stopped.
    refused = found["refused"]["pushed"]
    error = refused.pop("router_notification_error")
    assert error.startswith(f"sidecar at http://127.0.0.1:{stack.sidecar.port}: HTTP 401") and refused == {}
    assert stack.job(jobs["refused"])["status"] == "RUNNING"

    # No XCom where the callback runs (the DAG processor's): the audit trail goes to the log.
    assert found["unwritable"]["pushed"] == {}
    assert stack.job(jobs["unwritable"])["status"] == "FAILED"
    assert "XCom not writable here (RuntimeError); audit trail:" in found["log"]
    assert found["no_ti"] is None and "no task instance in the context" in found["log"]
    assert "on_retry_callback: could not tell the sidecar (AttributeError)" in found["log"]  # unusable ti
    assert TOKEN not in json.dumps(found) and stack.sidecar.token not in json.dumps(found)
