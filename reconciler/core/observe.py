"""A job and its task instance in the decision table's terms: the key a job's task instance has in
Airflow's answers (:func:`ti_key`), what an answer says (:func:`observe`), and the decision for the
job (:func:`judge`, the table of :mod:`.decision` with the job's try and identity)."""

from __future__ import annotations

from reconciler.airflow.task_instances import TaskInstance, TaskInstancePath
from reconciler.core.decision import Absent, Decision, Observation, Observed, decide
from router_db import JobRecord


def ti_key(job: JobRecord) -> TaskInstancePath:
    key = job.key
    return TaskInstancePath(
        dag_id=key.dag_id, run_id=key.run_id, task_id=key.task_id, map_index=key.map_index
    )


def observe(ti: TaskInstance | None) -> Observation:
    return Absent() if ti is None else Observed(ti.state, ti.try_number, ti.identity)


def judge(job: JobRecord, observation: Observation) -> Decision:
    """The decision table for this job (its try and its task instance's identity)."""
    return decide(job.key.try_number, observation, job_identity=job.ti_identity)
