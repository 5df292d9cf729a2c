"""Prometheus metrics of the reconciler. No job or run ids as labels: cardinality stays fixed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cycles = Counter(
            "reconciler_cycles",
            "Poll cycles by result (ok, airflow_error, db_error, error).",
            ["result"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            "reconciler_cycle_duration_seconds", "Wall time of one poll cycle.", registry=r
        )
        self.divergences = Counter(
            "reconciler_divergences", "Confirmed divergences by kind.", ["kind"], registry=r
        )
        self.stop_requests = Counter(
            "reconciler_stop_requests",
            "Stop calls to agents by outcome "
            "(stopped, already_finished, survived, unknown_job, retry, rejected).",
            ["outcome"],
            registry=r,
        )
        self.detection_latency = Histogram(
            "reconciler_detection_latency_seconds",
            "From a task instance's end_date (when Airflow ended it) to the confirmed divergence.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.airflow_requests = Counter(
            "reconciler_airflow_requests",
            "Requests to Airflow's API by HTTP code (or 'error').",
            ["code"],
            registry=r,
        )
        self.targeted_reads = Counter(
            "reconciler_targeted_reads",
            "Requests of the targeted read by purpose (in_flight, deferred_count, locate_count, rows).",
            ["read"],
            registry=r,
        )
        self.targeted_surplus = Gauge(
            "reconciler_targeted_count_surplus",
            "Task instances by which the targeted read's last deferred count differed from what it knew "
            "and that no read of that cycle accounted for (a locating read failed): as many drops wait "
            "for the next cycle.",
            registry=r,
        )
        self.active_jobs = Gauge("reconciler_active_jobs", "Jobs the router DB considers active.", registry=r)
        self.stopping_jobs = Gauge(
            "reconciler_stopping_jobs",
            "Jobs whose stop intent is recorded but not yet confirmed by their agent (the stop backlog).",
            registry=r,
        )
        self.last_success = Gauge(
            "reconciler_last_success_timestamp_seconds", "Unix time of the last successful cycle.", registry=r
        )
        self.agents = Gauge(
            "reconciler_agents",
            "Configured agents by state (live, suspect, draining: takes no new job, lost, "
            "wrong_identity: another agent answers there, revoked, outdated: a version too old).",
            ["state"],
            registry=r,
        )
        self.agents_in_maintenance = Gauge(
            "reconciler_agents_in_maintenance",
            "Live or suspect agents taking no new job, by who set it: operator (a drain or a maintenance "
            "asked for) or agent (its own, until it recovers: a disk nearly full, a home it cannot write).",
            ["by"],
            registry=r,
        )
        # Per label set (an agent's labels, sorted and comma-joined; [[agents]] or a registered agent's
        # heartbeat): no more series than agents.
        self.agent_capacity = Gauge(
            "reconciler_agent_capacity",
            "Job slots of the agents carrying this label set that take new jobs (not draining, lost or "
            "wrong_identity): the sum of their max_jobs, +Inf when one has no limit.",
            ["labels"],
            registry=r,
        )
        self.agent_active_jobs = Gauge(
            "reconciler_agent_active_jobs",
            "Active jobs (router DB) on the agents carrying this label set, draining ones included.",
            ["labels"],
            registry=r,
        )
        self.no_capacity = Counter(
            "reconciler_no_capacity",
            "Submissions refused because no agent the route allows could take the job (503 or 409).",
            registry=r,
        )
        self.heartbeats = Counter(
            "reconciler_agent_heartbeats",
            "Registrations and heartbeats of agents (PUT /agents/{id}), by result: accepted, refused "
            "(an id held by a live agent elsewhere or configured statically, an address the sidecar "
            "cannot reach, the wrong agent there, too many at once, a credential not the agent's or "
            "expired), out_of_scope (an id, a label or an address [fleet] does not allow, or "
            "max_agents reached), or revoked (an id whose credential an operator revoked).",
            ["result"],
            registry=r,
        )
        self.agents_held = Gauge(
            "reconciler_agents_held",
            "Agents silent past lost_after_seconds that are not declared lost, because most agents fail "
            "at once (the sidecar's own network is the likely fault); held for at most "
            "[fleet] partition_hold_seconds.",
            registry=r,
        )
        self.lost_jobs = Counter(
            "reconciler_lost_agent_jobs", "Jobs ended FAILED because their agent was lost.", registry=r
        )
        self.fenced_jobs = Counter(
            "reconciler_fenced_jobs",
            "at_most_once jobs of lost agents ended FAILED, each once its fence had surely stopped it.",
            registry=r,
        )
        self.fence_waiting_jobs = Gauge(
            "reconciler_fence_waiting_jobs",
            "at_most_once jobs of lost agents not ended yet: their agent's fence may still be stopping them.",
            registry=r,
        )
        self.orphans_stopped = Counter(
            "reconciler_orphans_stopped",
            "Jobs an agent still ran although the router DB had ended them (or never knew them), stopped.",
            registry=r,
        )
        self.full_resync_failing = Gauge(
            "reconciler_full_resync_failing",
            "1 while the periodic full read of the active jobs' task instances keeps failing.",
            registry=r,
        )
        self.leader = Gauge("reconciler_leader", "1 while this replica runs the poll loop.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
