"""Airflow's answers as the sidecar reads them: a task instance (:class:`TaskInstance`, parsed strictly
by :func:`parse_task_instance`), its key (:class:`TaskInstancePath`), what the core reads through
(:class:`TaskInstanceReader`, which the client and the simulation implement), and the one error
(:class:`AirflowError`): anything the client cannot vouch for, never a reason to stop a job."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol


class AirflowError(Exception):
    """Airflow gave no usable answer. Messages never carry credentials; ``status`` is the HTTP code
    when Airflow (or a proxy) answered with one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# Answers that refuse a request itself rather than say Airflow is unwell: Airflow 2's batch endpoint
# answers 403 to a whole request naming one DAG the user may not read, a proxy 413 to a large body.
REFUSALS = frozenset({400, 403, 404, 405, 413, 422})


@dataclass(frozen=True, slots=True)
class TaskInstance:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    state: str | None
    try_number: int
    end_date: datetime | None
    # Tells this task instance from another of the same key (a DAG run deleted and created again):
    # its id on Airflow 3 (one per try), its run's logical date on Airflow 2; None if Airflow gave none.
    identity: str | None = None

    @property
    def key(self) -> TaskInstancePath:
        return TaskInstancePath(self.dag_id, self.run_id, self.task_id, self.map_index)


class TaskInstancePath(NamedTuple):
    """A task instance as Airflow's URLs name it (``/dags/{dag}/dagRuns/{run}/taskInstances/{task}``):
    the lookup key of reads. The router DB's :class:`router_db.TaskInstanceKey` adds the try."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int


def parse_task_instance(raw: Any) -> TaskInstance:
    """One task instance from Airflow's JSON (same field names in v1 and v2), or AirflowError."""
    if not isinstance(raw, dict):
        raise AirflowError("task instance is not an object")
    try:
        dag_id, run_id, task_id = raw["dag_id"], raw["dag_run_id"], raw["task_id"]
        map_index, state, try_number = raw["map_index"], raw["state"], raw["try_number"]
    except KeyError as exc:
        raise AirflowError(f"task instance lacks field {exc.args[0]!r}") from None
    if not all(isinstance(v, str) for v in (dag_id, run_id, task_id)):
        raise AirflowError("task instance ids are not strings")
    if not _is_int(map_index) or not _is_int(try_number):
        raise AirflowError("task instance map_index/try_number are not integers")
    if state is not None and not isinstance(state, str):
        raise AirflowError("task instance state is not a string")
    return TaskInstance(
        dag_id,
        run_id,
        task_id,
        map_index,
        state,
        try_number,
        _parse_time(raw.get("end_date")),
        _identity(raw),
    )


def _identity(raw: dict[str, Any]) -> str | None:
    ti_id, logical = raw.get("id"), raw.get("execution_date")
    if ti_id is not None:
        if not isinstance(ti_id, str) or not ti_id:
            raise AirflowError("task instance id is not a string")
        return ti_id
    if logical is not None:  # Airflow 2 (API v1): no id; the run's logical date tells runs apart
        parsed = _parse_time(logical)
        return logical_date_identity(parsed) if parsed is not None else None
    return None


def logical_date_identity(moment: datetime) -> str:
    """How a run's logical date identifies its task instances on Airflow 2; the operator sends the same
    text (``agentic_airflow.sidecar_client.ti_identity``)."""
    return "logical_date:" + moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise AirflowError("task instance end_date is not a string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise AirflowError("task instance end_date is not ISO-8601") from None
    return parsed if parsed.tzinfo is not None else None


class TaskInstanceReader(Protocol):
    """What the loop reads from Airflow; :class:`AirflowClient` is the real one."""

    async def changed_since(self, since: datetime) -> list[TaskInstance]: ...

    def task_instance_pages(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None] | None = None,
    ) -> AsyncIterator[list[TaskInstance]]: ...

    async def count_task_instances(
        self,
        *,
        dag_ids: Iterable[str],
        run_ids: Iterable[str],
        task_ids: Iterable[str],
        states: Sequence[str | None],
    ) -> int: ...

    async def get_task_instance(
        self, *, dag_id: str, run_id: str, task_id: str, map_index: int
    ) -> TaskInstance | None: ...

    async def ping(self) -> None: ...
