"""Optional task callbacks that tell the sidecar at once when a task fails or goes up for retry.

A fast path, never a dependency: the reconciler reads every task instance's state from Airflow's
API on its own and stops what Airflow no longer wants, callbacks or not. Airflow does not run
callbacks for tasks a person marks failed or success, or clears, which is why the reconciler exists.
What a callback does add is speed, for a failure Airflow decides itself (a deferral's timeout, say):
the sidecar hears of it now rather than at its next poll. It still stops nothing before its own
read of Airflow confirms.

Callbacks never raise and never fail a task. They leave an audit trail in the task's XCom:
``agentic_job_id``, then ``router_status_notification`` (the sidecar's answer) or
``router_notification_error`` (why there was none; never the token). Where XCom cannot be written
(a callback run by the DAG processor, say) the same is logged instead.

Use: ``on_failure_callback=notify_router_on_failure``, the operator mixin
:class:`AgenticCallbackMixin`, or :func:`enable_router_callbacks` for a whole DAG. Each keeps the
callbacks already set and adds these after them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from agentic_airflow.connection import DEFAULT_CONN_ID
from agentic_airflow.hooks import AgenticRunHook
from agentic_airflow.operators import JOB_ID_XCOM_KEY, AgenticRunOperator
from agentic_airflow.sidecar_client import (
    UPDATE_TIMEOUT_SECONDS,
    SidecarError,
    post_status_update,
    status_update_request,
)
from sidecar_api.protocol import WireError

log = logging.getLogger(__name__)

NOTIFICATION_XCOM_KEY = "router_status_notification"
ERROR_XCOM_KEY = "router_notification_error"

Callback = Callable[[Any], None]


class AgenticRouterStatusHook(AgenticRunHook):
    """``POST /jobs/update_status`` on the sidecar of ``agentic_conn_id``."""

    def __init__(
        self, agentic_conn_id: str = DEFAULT_CONN_ID, *, timeout: float = UPDATE_TIMEOUT_SECONDS
    ) -> None:
        super().__init__(agentic_conn_id, timeout=timeout)

    def notify_status_change(
        self,
        *,
        status: str,
        reason: str | None = None,
        job_id: str | None = None,
        dag_id: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        map_index: int = -1,
    ) -> dict[str, Any]:
        """Report a task's new state; the job is ``job_id``, else the newest try's of the task
        instance. Returns the sidecar's answer: its ``action`` says what it did (``stopped``,
        ``stop_requested``, ``kept``, ``already_final``, ``none``...). Raises :class:`WireError` for a
        request the sidecar would refuse, :class:`SidecarError` when no answer of the sidecar's came."""
        body = status_update_request(
            status=status,
            reason=reason,
            job_id=job_id,
            dag_id=dag_id,
            task_id=task_id,
            run_id=run_id,
            map_index=map_index,
        )
        with self.stops_on_sigterm("the sidecar's answer to a status update") as stop:
            endpoint = self.get_endpoint()
            with stop.interruptible():
                return post_status_update(endpoint, body, timeout=self.timeout)


def notify_router_on_failure(context: Mapping[str, Any]) -> None:
    """An ``on_failure_callback``: the task failed, the sidecar checks its job now."""
    _notify(context, status="failed", callback="on_failure_callback")


def notify_router_on_retry(context: Mapping[str, Any]) -> None:
    """An ``on_retry_callback``: this try is over, the sidecar checks its job now."""
    _notify(context, status="up_for_retry", callback="on_retry_callback")


# No success variant: the operator succeeds only once its job has succeeded, so there is nothing to stop.
ROUTER_CALLBACKS: tuple[tuple[str, Callback], ...] = (
    ("on_failure_callback", notify_router_on_failure),
    ("on_retry_callback", notify_router_on_retry),
)


def chained(current: Any, callback: Callback) -> list[Callback]:
    """``current`` (None, one callable or several) followed by ``callback``, which is added once only.
    Airflow runs a list's callbacks in order, each on its own: one that raises stops no other."""
    if current is None:
        existing: list[Callback] = []
    elif isinstance(current, list | tuple):
        existing = list(current)
    else:
        existing = [current]
    return existing if callback in existing else [*existing, callback]


def install_router_callbacks(task: Any) -> None:
    """Add the router callbacks to one task (an operator, or a mapped one), after its own."""
    for attribute, callback in ROUTER_CALLBACKS:
        setattr(task, attribute, chained(getattr(task, attribute, None), callback))


def enable_router_callbacks(dag: Any) -> list[str]:
    """Add the router callbacks to every :class:`AgenticRunOperator` task of ``dag`` (mapped ones too),
    keeping their callbacks; call it in the DAG file once the tasks exist. The task ids changed."""
    changed = []
    for task in dag.tasks:
        operator_class = getattr(task, "operator_class", None)  # a mapped task's (partial().expand())
        if isinstance(task, AgenticRunOperator) or (
            isinstance(operator_class, type) and issubclass(operator_class, AgenticRunOperator)
        ):
            install_router_callbacks(task)
            changed.append(task.task_id)
    return changed


class AgenticCallbackMixin:
    """Put before the operator: ``class MyRun(AgenticCallbackMixin, AgenticRunOperator)``. Installs the
    router callbacks after those the task got (its arguments, ``default_args``, the DAG's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install_router_callbacks(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in vars(cls):
            # Airflow 3 applies default_args to an operator class's __init__ only if the class defines
            # one, and fails at construction when it does not; a class made of this mixin and an
            # operator defines none, so it gets its own.
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                AgenticCallbackMixin.__init__(self, *args, **kwargs)

            setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses assigning a method)


def _notify(context: Mapping[str, Any], *, status: str, callback: str) -> None:
    try:
        ti = context.get("ti") or context.get("task_instance")
        if ti is None:
            log.warning("%s: no task instance in the context; the sidecar's poll will see it", callback)
            return
        task = context.get("task") or getattr(ti, "task", None)
        conn_id = getattr(task, "conn_id", None) or DEFAULT_CONN_ID
        job_id = _job_id(ti)
        try:
            answer = AgenticRouterStatusHook(conn_id).notify_status_change(
                status=status,
                reason=f"Airflow ran {callback} (try {getattr(ti, 'try_number', '?')})",
                job_id=job_id,
                dag_id=ti.dag_id,
                task_id=ti.task_id,
                run_id=ti.run_id,
                map_index=getattr(ti, "map_index", -1),
            )
        except Exception as exc:
            error = _describe(exc)
            log.warning("%s: could not tell the sidecar (%s); its poll will see the task", callback, error)
            _record(ti, callback, {ERROR_XCOM_KEY: error})
            return
        log.info("%s: the sidecar answered %s (%s)", callback, answer.get("action"), answer.get("message"))
        found = answer.get("job_id")
        audit: dict[str, Any] = {JOB_ID_XCOM_KEY: found} if found and found != job_id else {}
        _record(ti, callback, {**audit, NOTIFICATION_XCOM_KEY: answer})
    except Exception as exc:  # whatever happens, the task's outcome stays Airflow's
        log.warning("%s: router notification skipped: %s", callback, _describe(exc))


def _job_id(ti: Any) -> str | None:
    """The job id the operator pushed before deferring, when XCom can be read here."""
    try:
        value = ti.xcom_pull(task_ids=ti.task_id, key=JOB_ID_XCOM_KEY, map_indexes=ti.map_index)
    except Exception as exc:
        log.info("no job id from XCom here (%s): the sidecar finds the job by task", type(exc).__name__)
        return None
    return str(value) if value else None


def _record(ti: Any, callback: str, values: dict[str, Any]) -> None:
    """The audit trail in XCom, or in the log where XCom cannot be written."""
    try:
        for key, value in values.items():
            ti.xcom_push(key=key, value=value)
    except Exception as exc:
        log.info("%s: XCom not writable here (%s); audit trail: %s", callback, type(exc).__name__, values)


def _describe(exc: Exception) -> str:
    """Our errors' own words (they never hold the token); other errors by type alone, since a secrets
    backend's may quote what it read."""
    if isinstance(exc, SidecarError | WireError):
        return str(exc)
    return type(exc).__name__
