"""``AgenticJobLink``: the task's "Agentic job" button, pointing at its job's page in the sidecar.

``{base_url}/ui/jobs/{job_id}``, which asks a person without a session to log in first: the job id is
the XCom ``agentic_job_id`` the operator pushes before it defers, the base URL the operator's
connection's. Airflow 3 asks for the link in the worker when the task defers and when it ends, and
keeps it in XCom; Airflow 2's webserver asks each time it shows it. A link never raises: without a
job id yet, or a connection to read, it is "".
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from agentic_airflow.connection import DEFAULT_CONN_ID, get_base_url
from agentic_airflow.sidecar_client import SidecarError

try:  # Airflow 3
    from airflow.sdk import BaseOperatorLink
    from airflow.sdk.execution_time.xcom import XCom
except ImportError:  # Airflow 2
    from airflow.models.baseoperatorlink import BaseOperatorLink
    from airflow.models.xcom import XCom

log = logging.getLogger(__name__)


def job_url(base_url: str, job_id: str) -> str:
    """The job's page; any ``user:password@`` in the base URL (an ``extra.base_url`` may carry one) is
    left out: the link is shown to everyone who sees the task."""
    parts = urlsplit(base_url)
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        base_url = urlunsplit(parts._replace(netloc=netloc))
    return f"{base_url}/ui/jobs/{quote(job_id, safe='')}"


class AgenticJobLink(BaseOperatorLink):
    name = "Agentic job"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        # Imported here: the operator's module imports this one for its operator_extra_links.
        from agentic_airflow.operators import JOB_ID_XCOM_KEY

        try:
            job_id = XCom.get_value(ti_key=ti_key, key=JOB_ID_XCOM_KEY)
            if not job_id:
                return ""  # not submitted yet
            # Airflow 2's webserver hands in the serialized task: conn_id is one of its template fields.
            conn_id = getattr(operator, "conn_id", None) or DEFAULT_CONN_ID
            return job_url(get_base_url(conn_id), str(job_id))
        except Exception as exc:  # a secrets backend's error may quote what it read: its type only
            detail = str(exc) if isinstance(exc, SidecarError) else type(exc).__name__
            log.warning("no %r link for %s: %s", self.name, getattr(ti_key, "task_id", ti_key), detail)
            return ""
