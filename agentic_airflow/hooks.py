"""``AgenticRunHook``: the sidecar as an Airflow connection type, ``agentic_run``, with its form.

The connection: host and port of the sidecar, its token as the password (labelled "Token"), and in
the extra ``base_path`` (a path prefix behind a proxy), ``ca_file`` (the CA of an https sidecar) and
``scheme``. The operator and the trigger read the same connection through
:mod:`agentic_airflow.connection`; connections of type ``http``/``https`` work as well.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from agentic_airflow.connection import DEFAULT_CONN_ID, get_endpoint
from agentic_airflow.provider import CONN_FIELDS, CONN_TYPE, HOOK_NAME, UI_FIELD_BEHAVIOUR
from agentic_airflow.sidecar_client import (
    SidecarEndpoint,
    SidecarError,
    classify_response,
    describe_failure,
    job_query,
    parse_object,
)
from agentic_airflow.stopping import StopOnSigterm
from sidecar_api.protocol import MAX_WAIT_SECONDS, WireError, validate_job_id

try:  # Airflow 3
    from airflow.sdk import BaseHook
except ImportError:  # Airflow 2
    from airflow.hooks.base import BaseHook
try:  # Airflow 3.2+; what its task runner and Airflow 2's fail a task stopped by SIGTERM with
    from airflow.sdk.exceptions import AirflowTaskTerminated
except ImportError:  # Airflow 2, 3.0, 3.1
    from airflow.exceptions import AirflowTaskTerminated


class AgenticRunHook(BaseHook):
    """The sidecar's router API through an Airflow connection (``agentic_conn_id``)."""

    conn_name_attr = "agentic_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = HOOK_NAME

    def __init__(self, agentic_conn_id: str = DEFAULT_CONN_ID, *, timeout: float = 10.0) -> None:
        super().__init__()
        self.agentic_conn_id = agentic_conn_id
        self.timeout = timeout

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The extra fields for Airflow 2's form and Airflow 3.0-3.1's (which calls this with stand-ins
        for these classes); Airflow 3.2+ reads the same declaration from provider info instead."""
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import StringField
        from wtforms.validators import Optional, any_of

        widgets: dict[str, Any] = {}
        for name, field in CONN_FIELDS.items():
            schema = field["schema"]
            choices = schema.get("enum")
            widgets[name] = StringField(
                lazy_gettext(field["label"]),
                widget=BS3TextFieldWidget(),
                description=field["description"],
                default=schema.get("default"),
                validators=[Optional(), any_of(choices)] if choices else [Optional()],
            )
        return widgets

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Hidden, relabelled and placeholder fields of the form (a copy: Airflow rewrites it)."""
        return copy.deepcopy(UI_FIELD_BEHAVIOUR)

    def stops_on_sigterm(self, waiting_for: str) -> StopOnSigterm:
        """In a task, SIGTERM ends a request of this hook's at once (Airflow 3 alone would only call
        the operator's on_kill, and the request would run its course), logging ``waiting_for``; see
        :mod:`agentic_airflow.stopping`. Not for :meth:`test_connection`: Airflow's servers run it, and
        a server's SIGTERM lets the request in progress finish."""
        reason = f"stopped by SIGTERM while waiting for {waiting_for}"
        return StopOnSigterm(lambda: reason, log=self.log, terminated=AirflowTaskTerminated)

    def get_endpoint(self) -> SidecarEndpoint:
        """Address and token, read afresh (a rotated token is seen). :class:`SidecarError` when the
        connection is not defined, cannot be loaded (naming Airflow's error) or is incomplete."""
        return get_endpoint(self.agentic_conn_id)

    @contextmanager
    def _client(self, endpoint: SidecarEndpoint) -> Iterator[httpx.Client]:
        with httpx.Client(
            base_url=endpoint.base_url,
            headers=endpoint.headers,
            timeout=self.timeout,
            verify=endpoint.verify(),
        ) as client:
            yield client

    def get_job(self, job_id: str, *, wait: float = 0.0, status: str | None = None) -> dict[str, Any]:
        """``GET /jobs/{job_id}``: the job's record; with ``wait`` (seconds, at most 60), once its
        status differs from ``status`` (default: its status now) or it has ended, or when ``wait``
        has passed (a sidecar that predates ``wait`` answers at once). :class:`SidecarError` for any
        other answer, the sidecar's own "job not found" included, or none."""
        try:
            validate_job_id(job_id)
        except WireError as exc:
            raise SidecarError(str(exc)) from None
        with self.stops_on_sigterm(f"the sidecar's answer about job {job_id}") as stop:
            endpoint = self.get_endpoint()
            try:
                with stop.interruptible(), self._client(endpoint) as client:
                    response = client.get(
                        f"/jobs/{job_id}",
                        params=job_query(wait=wait, status=status),
                        timeout=self.timeout + min(max(wait, 0.0), MAX_WAIT_SECONDS),
                    )
            except httpx.HTTPError as exc:
                raise SidecarError(describe_failure(endpoint, exc)) from None
        answer = classify_response(job_id, response)
        if answer.job is None:
            raise SidecarError(f"sidecar at {endpoint.base_url}: {answer.detail}")
        return answer.job

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's "Test" button: one authenticated, cheap read (the first job of the list), so a
        wrong token fails the test as it would fail a task. The message never contains the token."""
        try:
            endpoint = self.get_endpoint()
        except SidecarError as exc:
            return False, str(exc)
        except Exception as exc:  # a secrets backend's error may quote what it read: its type only
            return False, f"cannot read the connection {self.agentic_conn_id}: {type(exc).__name__}"
        try:
            with self._client(endpoint) as client:
                response = client.get("/jobs", params={"limit": 1})
        except SidecarError as exc:  # a CA file that cannot be loaded
            return False, str(exc)
        except httpx.HTTPError as exc:
            return False, describe_failure(endpoint, exc)
        code, body = response.status_code, parse_object(response.content)
        where = f"sidecar at {endpoint.base_url}"
        if code == 200 and body is not None and isinstance(body.get("jobs"), list):
            return True, f"{where} answered and accepted the token"
        if code in (401, 403):
            return False, f"{where} refused the token (HTTP {code})"
        if code == 429:
            return False, f"{where} is rate-limiting this client (HTTP 429); try again shortly"
        return False, f"{where} answered HTTP {code}, not as the sidecar does (wrong host, port, base_path?)"
