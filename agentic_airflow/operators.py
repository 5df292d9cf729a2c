"""``AgenticRunOperator``: run a command on a remote agent through the sidecar, deferred while it runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from agentic_airflow.connection import get_endpoint
from agentic_airflow.links import AgenticJobLink
from agentic_airflow.polling import Submission, submit_patiently
from agentic_airflow.sidecar_client import logical_date_identity
from agentic_airflow.stopping import StopOnSigterm
from agentic_airflow.triggers import AgenticJobTrigger
from sidecar_api.protocol import TERMINAL, JobStatus

try:  # Airflow 3
    from airflow.sdk import BaseOperator
except ImportError:  # Airflow 2
    from airflow.models import BaseOperator
from airflow.exceptions import AirflowException

try:  # Airflow 3.2+; what its task runner and Airflow 2's fail a task stopped by SIGTERM with
    from airflow.sdk.exceptions import AirflowTaskTerminated
except ImportError:  # Airflow 2, 3.0, 3.1
    from airflow.exceptions import AirflowTaskTerminated

DEFERRAL_SLACK_SECONDS = 60.0
JOB_ID_XCOM_KEY = "agentic_job_id"  # the job's id in the sidecar; the return value (XCom) holds it too


def ti_identity(ti: Any, context: Any) -> str:
    """What tells this task instance from one of a DAG run deleted and created again with the same
    run_id: its id on Airflow 3 (a new one each try), its run's logical date on Airflow 2."""
    ti_id = getattr(ti, "id", None)
    if ti_id:
        return str(ti_id)
    dag_run = context.get("dag_run")
    logical = getattr(dag_run, "execution_date", None) or getattr(dag_run, "logical_date", None)
    return logical_date_identity(logical) if logical is not None else ""


class AgenticRunOperator(BaseOperator):
    """Run ``command`` on an agent chosen by ``agent_id`` or ``route_labels``.

    The job is submitted with the task instance's key (dag, task, run, map index, try), so the
    reconciler can stop it when the task is marked failed or success, cleared, or its run deleted.
    The task defers while the job runs: it takes no worker slot, and ends with the job's outcome.
    While it runs, the job's output is appended to the task's log (``stream_output``); a failed
    job's last ``log_tail_bytes`` of output are in the task's error as well.

    ``at_most_once``: never two copies at once. The job's agent stops it once cut off from the sidecar
    for its ``[agent] fence_after_seconds`` (default 60), before the sidecar declares the agent lost and
    a retry may start elsewhere; the task then fails with the reason ``fenced: ...``. The price: an
    outage of every sidecar replica (or of the router DB) longer than that stops the job, where one
    without it would run on. An agent that does not fence refuses the job (the task fails, saying so).
    """

    # conn_id too: a serialized task (what Airflow 2's webserver builds the job link from) keeps it.
    template_fields: Sequence[str] = ("command", "env", "cwd", "conn_id")
    ui_color = "#d6e9f8"
    operator_extra_links = (AgenticJobLink(),)

    def __init__(
        self,
        *,
        command: str,
        agent_id: str | None = None,
        route_labels: Sequence[str] | None = None,
        conn_id: str = "agentic_run_default",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        run_as: str | None = None,
        timeout_seconds: float | None = None,
        poll_interval: float = 5.0,
        log_tail_bytes: int = 4000,
        stream_output: bool = True,
        at_most_once: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.agent_id = agent_id
        self.route_labels = list(route_labels or [])
        self.conn_id = conn_id
        self.env = env
        self.cwd = cwd
        self.run_as = run_as
        self.timeout_seconds = timeout_seconds
        self.poll_interval = poll_interval
        self.log_tail_bytes = log_tail_bytes
        self.stream_output = stream_output
        self.at_most_once = at_most_once

    def _time_left(self, ti: Any) -> float | None:
        """Seconds left of ``execution_timeout`` (Airflow does not enforce it while a task is deferred:
        the job and the deferral carry it), or None without one."""
        if self.execution_timeout is None:
            return None
        started = getattr(ti, "start_date", None)
        elapsed = (datetime.now(UTC) - started).total_seconds() if started is not None else 0.0
        allowed: float = self.execution_timeout.total_seconds()
        return max(1.0, allowed - max(0.0, elapsed))

    def execute(self, context: Any) -> None:
        ti = context["ti"]
        left = self._time_left(ti)
        timeouts = [t for t in (self.timeout_seconds, left) if t is not None]
        job = submit_patiently(
            lambda: get_endpoint(self.conn_id),
            {
                "command": self.command,
                "agent_id": self.agent_id,
                "labels": self.route_labels,
                "env": self.env,
                "cwd": self.cwd,
                "run_as": self.run_as,
                # The agent stops the job when execution_timeout runs out, as a worker would.
                "timeout_seconds": min(timeouts) if timeouts else None,
                "at_most_once": self.at_most_once,
                "dag_id": ti.dag_id,
                "task_id": ti.task_id,
                "run_id": ti.run_id,
                "map_index": ti.map_index,
                "try_number": ti.try_number,
                "ti_identity": ti_identity(ti, context),
            },
            conn_id=self.conn_id,
            log=self.log,
            # SIGTERM ends the wait at once (Airflow 3's own handler would only call on_kill).
            terminated=AirflowTaskTerminated,
        )
        # Until it defers, SIGTERM still ends the task (once the XCom is written), saying so.
        submitted = Submission(job_id=job["job_id"])
        with StopOnSigterm(submitted.describe, log=self.log, terminated=AirflowTaskTerminated):
            # Before deferring: whoever looks at the task (UI, API, a later task) finds its job at once.
            ti.xcom_push(key=JOB_ID_XCOM_KEY, value=job["job_id"])
            self.log.info(
                "job %s on agent %s: %s%s",
                job["job_id"],
                job["agent_id"],
                job["status"],
                "" if job.get("created", True) else " (already submitted)",
            )
        if job["status"] in TERMINAL:
            self.execute_complete(context, {**job, "log_tail": ""})
            return
        self.defer(
            trigger=AgenticJobTrigger(
                job["job_id"],
                self.conn_id,
                self.poll_interval,
                self.log_tail_bytes,
                # The job's output joins the task's log as it comes (one more request a poll).
                log_offset=0 if self.stream_output else None,
            ),
            method_name="execute_complete",
            # Past it Airflow fails the task even if the job's agent never answers again (a lost VM):
            # the sidecar then stops the job as for any failed task. A minute's slack lets the
            # agent's own timeout report first, with its reason.
            timeout=timedelta(seconds=left + DEFERRAL_SLACK_SECONDS) if left is not None else None,
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> str:
        job_id, status = event.get("job_id"), event.get("status")
        if status == JobStatus.SUCCEEDED:
            self.log.info("job %s succeeded", job_id)
            return str(job_id)
        if status == "ERROR":
            raise AirflowException(f"lost track of job {job_id}: {event.get('error')}")
        raise AirflowException(
            f"job {job_id} {status} with rc={event.get('rc')}: {event.get('reason')}\n"
            f"--- last output ---\n{event.get('log_tail', '')}"
        )
