"""The connection's address (``agentic_run``, ``base_path``, ``scheme``), why Airflow gave no
connection, and the status update the optional callbacks send, without Airflow: the sidecar is played
by ``httpx.MockTransport``, Airflow's secrets backends by stand-ins.

tests/test_provider_airflow.py runs the same code inside real Airflow 3.3.2 and 2.11.2 venvs, against
a real sidecar.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from agentic_airflow.connection_errors import (
    LoadFailure,
    afirst_failure,
    describe,
    first_failure,
    not_defined,
    not_loaded,
    redact,
)
from agentic_airflow.provider import CONN_FIELDS, UI_FIELD_BEHAVIOUR, get_provider_info
from agentic_airflow.sidecar_client import (
    SidecarEndpoint,
    SidecarError,
    post_status_update,
    sidecar_address,
    status_update_request,
)
from sidecar_api.protocol import WireError

pytestmark = pytest.mark.fast

TOKEN = "the-connection-token"
JOB = "4f2a9c0e8b6d4e51a0c3f7d9e2b1a6c8"


def endpoint(conn_type: str | None = "agentic_run", host: str | None = "sidecar", **extra: Any) -> str:
    return SidecarEndpoint.from_connection(
        conn_type=conn_type, host=host, port=8790, password=TOKEN, extra=extra
    ).base_url


@pytest.mark.parametrize(
    ("conn_type", "host", "extra", "base_url"),
    [
        ("agentic_run", "sidecar", {}, "http://sidecar:8790"),
        ("agentic_run", "sidecar", {"scheme": "https"}, "https://sidecar:8790"),
        ("agentic_run", "sidecar", {"scheme": "HTTPS"}, "https://sidecar:8790"),
        ("agentic_run", "sidecar", {"scheme": None}, "http://sidecar:8790"),  # a form's empty field
        ("agentic_run", "https://sidecar", {"scheme": "http"}, "https://sidecar:8790"),  # the host's wins
        # What worked before keeps working: http://:TOKEN@host:port, the https type, extra base_url.
        ("http", "sidecar", {}, "http://sidecar:8790"),
        ("https", "sidecar", {}, "https://sidecar:8790"),
        ("http", "sidecar", {"scheme": "https"}, "https://sidecar:8790"),
        ("http", None, {"base_url": "https://proxy.example/x/"}, "https://proxy.example/x"),
    ],
)
def test_an_agentic_run_connection_is_http_unless_its_scheme_or_host_says_https(
    conn_type: str, host: str | None, extra: dict[str, Any], base_url: str
) -> None:
    assert endpoint(conn_type, host, **extra) == base_url


@pytest.mark.parametrize("base_path", ["/agentic", "agentic", "/agentic/", "//agentic//"])
def test_base_path_is_appended_to_the_address_with_one_slash(base_path: str) -> None:
    assert endpoint(base_path=base_path) == "http://sidecar:8790/agentic"
    assert endpoint(base_path=base_path.replace("agentic", "a/b")) == "http://sidecar:8790/a/b"
    assert endpoint("http", None, base_url="https://proxy/", base_path=base_path) == "https://proxy/agentic"
    assert (
        endpoint(base_path="") == endpoint(base_path=None) == endpoint(base_path="/") == "http://sidecar:8790"
    )


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"scheme": "ftp"}, "scheme"),
        ({"scheme": True}, "scheme"),
        ({"base_path": "https://proxy/agentic"}, "base_path"),
        ({"base_path": "/agentic?x=1"}, "base_path"),
        ({"base_path": "/a b"}, "base_path"),
        ({"base_path": 3}, "base_path"),
    ],
)
def test_a_bad_scheme_or_base_path_is_refused_naming_the_extra(extra: dict[str, Any], named: str) -> None:
    with pytest.raises(SidecarError, match=f"extra {named} must") as raised:
        endpoint(**extra)
    assert TOKEN not in str(raised.value)


def test_the_address_needs_no_token_but_the_endpoint_does() -> None:
    """A link shows the address of a connection that has no token yet; a request needs the token."""
    address = sidecar_address(conn_type="agentic_run", host="sidecar", port=None, extra={"base_path": "/a"})
    assert address == "http://sidecar/a"
    with pytest.raises(SidecarError, match="no token"):
        SidecarEndpoint.from_connection(
            conn_type="agentic_run", host="sidecar", port=1, password="", extra={}
        )


# --- the status update -----------------------------------------------------------------------------


def test_the_job_is_named_by_its_id_or_else_by_its_task_instance() -> None:
    ti = {"dag_id": "d", "task_id": "t", "run_id": "r", "map_index": 3}
    assert status_update_request(status="failed", reason="why", job_id=JOB, **ti) == {
        "status": "failed",
        "reason": "why",
        "job_id": JOB,
    }
    assert status_update_request(status="up_for_retry", **ti) == {"status": "up_for_retry", **ti}
    assert status_update_request(status="failed", dag_id="d", task_id="t", run_id="r")["map_index"] == -1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"status": "failed"}, "name the job"),
        ({"status": "failed", "dag_id": "d", "task_id": "t"}, "name the job"),
        ({"status": "failed", "job_id": "not a job id"}, "job_id must match"),
        ({"status": "x" * 33, "job_id": JOB}, "status must be"),
        ({"status": "failed", "dag_id": "d" * 251, "task_id": "t", "run_id": "r"}, "dag_id must be"),
        ({"status": "failed", "dag_id": "d", "task_id": "t", "run_id": "r", "map_index": -2}, "map_index"),
    ],
)
def test_a_request_the_sidecar_would_refuse_is_refused_before_it_is_sent(
    fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(WireError, match=named):
        status_update_request(**fields)


def post(answer: httpx.Response | Exception, *, base_path: str = "") -> tuple[dict[str, Any], httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    target = SidecarEndpoint(f"http://sidecar.test:8790{base_path}", TOKEN)
    body = status_update_request(status="failed", job_id=JOB)
    result = post_status_update(target, body, timeout=5, transport=httpx.MockTransport(handler))
    return result, seen[0]


def answer(code: int, action: str, ok: bool = True) -> httpx.Response:
    return httpx.Response(code, json={"ok": ok, "action": action, "message": "m", "job_id": JOB})


def test_the_update_goes_under_the_base_path_with_the_token_as_bearer() -> None:
    result, request = post(answer(200, "stopped"), base_path="/agentic")
    assert (request.method, request.url.path) == ("POST", "/agentic/jobs/update_status")
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert json.loads(request.content) == {"status": "failed", "job_id": JOB}
    assert result["action"] == "stopped"


@pytest.mark.parametrize(
    ("code", "action", "ok"),
    [
        (200, "stopped", True),
        (200, "already_final", True),
        (202, "stop_requested", True),
        (404, "none", False),  # no such job
        (409, "kept", False),  # Airflow still wants the task
        (503, "none", False),  # Airflow could not be read: nothing stopped
    ],
)
def test_every_answer_of_the_sidecars_is_returned_whatever_its_http_status(
    code: int, action: str, ok: bool
) -> None:
    result, _ = post(answer(code, action, ok))
    assert (result["action"], result["ok"]) == (action, ok)


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (httpx.Response(401, json={"error": "unauthorized"}), "HTTP 401: unauthorized"),
        (httpx.Response(403, json={"error": "forbidden"}), "HTTP 403"),
        (httpx.Response(429, json={"error": "rate limit exceeded"}), "HTTP 429"),
        (httpx.Response(502, text="<html>bad gateway</html>"), "HTTP 502"),
        (httpx.Response(200, json={"jobs": []}), "HTTP 200"),  # not the update's answer: a wrong path
        (httpx.ConnectError("refused"), "unreachable: ConnectError"),
        (httpx.ReadTimeout("slow"), "unreachable: ReadTimeout"),
    ],
)
def test_no_answer_of_the_sidecars_raises_and_never_names_the_token(
    reply: httpx.Response | Exception, said: str
) -> None:
    with pytest.raises(SidecarError, match=said) as raised:
        post(reply)
    assert "sidecar.test:8790" in str(raised.value) and TOKEN not in str(raised.value)


# --- the form --------------------------------------------------------------------------------------


def test_the_form_declares_each_extra_the_connection_reads_and_labels_the_password_token() -> None:
    assert set(CONN_FIELDS) == {"base_path", "ca_file", "scheme"}
    extra = {"base_path": "/agentic", "ca_file": "", "scheme": "https"}
    assert endpoint(**extra) == "https://sidecar:8790/agentic"  # each declared field is read
    assert UI_FIELD_BEHAVIOUR["relabeling"] == {"password": "Token"}
    assert set(UI_FIELD_BEHAVIOUR["hidden_fields"]) == {"schema", "login"}
    (declared,) = get_provider_info()["connection-types"]
    declared["conn-fields"]["scheme"]["label"] = "changed"  # Airflow may rewrite what it is given
    declared["ui-field-behaviour"]["placeholders"].clear()
    assert CONN_FIELDS["scheme"]["label"] == "Scheme" and UI_FIELD_BEHAVIOUR["placeholders"]


# --- why Airflow gave no connection --------------------------------------------------------------------


class Conn:
    def __init__(self, uri_error: Exception | None = None) -> None:
        self.uri_error = uri_error

    def get_uri(self) -> str:  # Airflow reads it after the connection: a password it cannot decrypt
        if self.uri_error is not None:
            raise self.uri_error
        return "agentic-run://sidecar"


class EnvironmentVariablesBackend:
    def __init__(self, answer: Conn | Exception | None) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def get_connection(self, conn_id: str) -> Conn | None:
        self.asked.append(conn_id)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class MetastoreBackend(EnvironmentVariablesBackend):
    pass


class AsyncBackend(EnvironmentVariablesBackend):
    async def aget_connection(self, conn_id: str) -> Conn | None:
        return self.get_connection(conn_id)


async def in_thread(call: Callable[[], Any]) -> Any:
    return call()


def failure(backends: list[EnvironmentVariablesBackend]) -> LoadFailure | None:
    """What the sync and the async read find (the same), the connection's id being CONN."""
    found = first_failure("agentic_run_default", backends)
    assert asyncio.run(afirst_failure("agentic_run_default", backends, in_thread)) == found
    return found


def test_a_connection_no_backend_fails_on_is_not_defined() -> None:
    backends = [EnvironmentVariablesBackend(None), MetastoreBackend(None)]
    assert failure(backends) is None
    assert all(b.asked == ["agentic_run_default"] * 2 for b in backends)
    assert str(not_defined("agentic_run_default")) == "the connection agentic_run_default is not defined"


def test_the_first_backend_that_fails_is_named_with_airflows_error() -> None:
    parse = ValueError("Port could not be cast to integer value as 'eighty'")
    found = failure([EnvironmentVariablesBackend(parse), MetastoreBackend(RuntimeError("later"))])
    assert found == LoadFailure("EnvironmentVariablesBackend", parse)
    assert str(found.as_error("agentic_run_default")) == (
        "the connection agentic_run_default could not be loaded: ValueError: Port could not be cast to "
        "integer value as 'eighty' (read by Airflow's EnvironmentVariablesBackend from "
        "AIRFLOW_CONN_AGENTIC_RUN_DEFAULT)"
    )
    # Not in the environment; the metadata DB cannot be read (nor can a password be decrypted there).
    db = RuntimeError("(psycopg2.OperationalError) connection refused\n[SQL: SELECT connection.password]")
    found = failure([EnvironmentVariablesBackend(None), MetastoreBackend(db)])
    assert found is not None and str(found.as_error("c")) == (
        "the connection c could not be loaded: RuntimeError: (psycopg2.OperationalError) connection refused "
        "(read by Airflow's MetastoreBackend)"
    )
    fernet = AttributeError("'MultiFernet' object has no attribute 'is_encrypted'")
    assert failure([MetastoreBackend(Conn(uri_error=fernet))]) == LoadFailure("MetastoreBackend", fernet)
    # A backend that found it (a failure that passed since): nothing to name.
    assert failure([MetastoreBackend(Conn()), EnvironmentVariablesBackend(fernet)]) is None


def test_the_async_read_uses_a_backends_own_async_read() -> None:
    backend = AsyncBackend(KeyError("throttled"))
    found = asyncio.run(afirst_failure("c", [backend], in_thread))
    assert found is not None and describe(found.error) == "KeyError: 'throttled'"
    assert backend.asked == ["c"]


@pytest.mark.parametrize(
    ("said", "shown"),
    [
        (
            f"Invalid connection string: agentic-run://:{TOKEN}@https://sidecar:8790.",
            "Invalid connection string: agentic-run://***@https://sidecar:8790.",
        ),
        # A token with an unencoded "/" or "@": everything up to the host goes.
        (f"cannot parse http://user:a/{TOKEN}@x@sidecar:1", "cannot parse http://***@sidecar:1"),
        (json.dumps({"host": "sidecar", "password": TOKEN}), '{"host": "sidecar", "password": ***}'),
        (
            f"Connection(conn_id='c', password='{TOKEN}', port=1)",
            "Connection(conn_id='c', password=***, port=1)",
        ),
        (f"GET /v1/secret?x=1&token={TOKEN}&y=2", "GET /v1/secret?x=1&token=***&y=2"),
        (f"{{'api_key': '{TOKEN}'}}", "{'api_key': ***}"),
        (f"Authorization: Bearer {TOKEN}", "Authorization: ***"),
        (f"refused: bearer {TOKEN}", "refused: bearer ***"),
        ("Expected integer value for `port`, but got 'eighty' instead.", None),  # nothing to hide
    ],
)
def test_airflows_error_is_shown_without_what_may_be_a_credential(said: str, shown: str | None) -> None:
    assert redact(said) == (said if shown is None else shown)
    assert TOKEN not in str(not_loaded("c", ValueError(said), "EnvironmentVariablesBackend"))


def test_airflows_error_is_shown_by_its_type_and_first_line_at_most_300_characters() -> None:
    assert describe(AttributeError()) == "AttributeError"
    assert describe(RuntimeError("\n  first\nsecond")) == "RuntimeError: first"
    long = describe(ValueError("x" * 1000))
    assert len(long) == 300 and long.startswith("ValueError: xxx") and long.endswith("...")
    assert str(not_loaded("c", OSError("gone"))) == "the connection c could not be loaded: OSError: gone"


@pytest.mark.parametrize(
    "value",
    [
        "http://:ab/cd+ef@127.0.0.1:8790",  # base64 with "/": URI parsing cuts the token there
        "http://user:ab?cd@127.0.0.1:8790",
        '{"conn_type": "http", "host": "h", "password": "ab/cd+ef", "port": "x"}',
    ],
)
def test_a_piece_of_the_token_that_airflow_quotes_is_hidden(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As Airflow 2.11.2 and 3.3.2 say it for the first value: the piece before "/" taken for the port.
    monkeypatch.setenv("AIRFLOW_CONN_C", value)
    said = ValueError("Port could not be cast to integer value as 'ab'")
    shown = str(not_loaded("c", said, "EnvironmentVariablesBackend"))
    assert "'ab'" not in shown and "cd" not in shown and "ef" not in shown, shown
    assert shown.startswith("the connection c could not be loaded: ValueError: Port could not be cast"), shown
