"""The core's parts, built once and wired through their constructors.

:func:`build_core` is the one place the loop's parts meet: the service builds them on the real router
DB, Airflow client, agents and clocks; tests and the simulation on their own. Nothing is assigned
after construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from reconciler.airflow.task_instances import TaskInstanceReader
from reconciler.config import PollConfig
from reconciler.core.active_jobs import ActiveJobs
from reconciler.core.agent_sync import AgentSync
from reconciler.core.confirmer import Confirmer
from reconciler.core.loop import ReconcileLoop
from reconciler.core.outcome import START_GRACE_SECONDS
from reconciler.core.reads import AirflowRead, read_for, reload_seconds
from reconciler.core.stops import StopDispatcher
from reconciler.core.watch import JobWatch
from reconciler.fleet.agents import AgentPool
from reconciler.fleet.liveness import Fleet
from reconciler.metrics import Metrics
from router_db import RouterDB


@dataclass(frozen=True)
class Core:
    jobs: ActiveJobs
    read: AirflowRead
    confirmer: Confirmer
    sync: AgentSync
    watch: JobWatch  # this process's long-poll waiters: every part's changes wake them
    fleet: Fleet | None
    loop: ReconcileLoop


def build_core(
    *,
    db: RouterDB,
    airflow: TaskInstanceReader,
    agents: AgentPool,
    dispatcher: StopDispatcher,
    metrics: Metrics,
    poll: PollConfig,
    fleet: Fleet | None = None,
    watch: JobWatch | None = None,
    unaddressable_grace_seconds: float = 0.0,
    start_grace_seconds: float = START_GRACE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    read: AirflowRead | None = None,
) -> Core:
    """The loop and its parts. ``clock`` times intervals (monotonic); ``wall`` is this process's
    clock, used where Airflow's times are compared with it. ``read``: the read of Airflow, if not the
    one ``[poll] strategy`` names (a bench's)."""
    watch = watch or JobWatch(db, period=poll.watch_seconds)
    jobs = ActiveJobs(
        db, reload_seconds=reload_seconds(poll), overlap_seconds=poll.overlap_seconds, clock=clock
    )
    read = read or read_for(poll, airflow, metrics, clock=clock, wall=wall)
    confirmer = Confirmer(airflow, dispatcher, metrics, concurrency=poll.max_concurrent_reads, wall=wall)
    sync = AgentSync(
        db=db,
        agents=agents,
        watch=watch,
        metrics=metrics,
        fleet=fleet,
        sweep_per_round=poll.agent_sync_per_cycle,
        interval_seconds=poll.interval_seconds,
        catch_up_seconds=poll.agent_catch_up_seconds,
        unaddressable_grace_seconds=unaddressable_grace_seconds,
        start_grace_seconds=start_grace_seconds,
        clock=clock,
    )
    loop = ReconcileLoop(
        jobs=jobs,
        read=read,
        confirmer=confirmer,
        sync=sync,
        dispatcher=dispatcher,
        metrics=metrics,
        fleet=fleet,
        interval_seconds=poll.interval_seconds,
        clock=clock,
    )
    return Core(jobs, read, confirmer, sync, watch, fleet, loop)
