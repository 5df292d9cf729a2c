"""The candidate reads that could replace the ``updated_at`` scan: request bodies of Airflow's batch endpoint.

Each body names the tracked jobs by the three lists the endpoint filters on (DAG ids, run ids, task
ids), so PostgreSQL can reach the rows through ``task_instance``'s own indexes whatever the history:

- R1 "transient rows": the tracked keys whose state is not final nor deferred. A steady cycle
  returns nothing; a job whose task instance was cleared, retried or rescheduled shows up here.
- R2 "deferred count": how many of the tracked keys are still deferred, ``page_limit`` 0, so only
  ``total_entries`` is computed. A count below the number of tracked jobs says one left ``deferred``.
- R3 "one DAG's keys, every state": the full check, one request per DAG, spread over a period.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.core.targeted import IN_FLIGHT_STATES

Key = tuple[str, str, str, int]  # dag_id, run_id, task_id, map_index

# Airflow 3.3's states a tracked job can pass through before it ends (``None``: not run yet): the
# targeted read's in-flight states.
TRANSIENT: list[str | None] = list(IN_FLIGHT_STATES)
PAGE = 1000  # rows per page of R1 and R3


@dataclass(frozen=True)
class Scope:
    """The jobs the reconciler tracks, as (dag, run, task) keys, and a name for the tables."""

    name: str
    keys: list[Key]

    @property
    def dags(self) -> list[str]:
        return sorted({k[0] for k in self.keys})

    def of_dag(self, dag_id: str) -> Scope:
        return Scope(dag_id, [k for k in self.keys if k[0] == dag_id])


def scope_of(keys: list[Key], dags: int | None, name: str) -> Scope:
    """The tracked keys of the first ``dags`` DAGs (by id), or all of them."""
    ordered = sorted(keys)
    chosen = sorted({k[0] for k in ordered})[:dags] if dags is not None else None
    return Scope(name, [k for k in ordered if chosen is None or k[0] in chosen])


def _lists(scope: Scope) -> dict[str, Any]:
    return {
        "dag_ids": scope.dags,
        "dag_run_ids": sorted({k[1] for k in scope.keys}),
        "task_ids": sorted({k[2] for k in scope.keys}),
    }


def transient_rows(scope: Scope) -> dict[str, Any]:
    """R1: the tracked keys in a state that is neither final nor deferred, first page."""
    return {**_lists(scope), "state": TRANSIENT, "order_by": "id", "page_limit": PAGE, "page_offset": 0}


def deferred_count(scope: Scope) -> dict[str, Any]:
    """R2: how many tracked keys are deferred; no rows (``page_limit`` 0), only ``total_entries``."""
    return {**_lists(scope), "state": ["deferred"], "page_limit": 0}


def one_dag(scope: Scope, dag_id: str) -> dict[str, Any]:
    """R3: one DAG's tracked keys in every state (one request of the full check)."""
    return {**_lists(scope.of_dag(dag_id)), "order_by": "id", "page_limit": PAGE}
