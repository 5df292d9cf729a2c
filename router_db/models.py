"""Typed SQLAlchemy 2 models of the router database."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware UTC datetimes; SQLite hands back naive ones, which are UTC by construction."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the router DB; use UTC-aware datetimes")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The task-instance key: how a task instance seen in Airflow is mapped back to its job.
    dag_id: Mapped[str] = mapped_column(String(250))
    task_id: Mapped[str] = mapped_column(String(250))
    run_id: Mapped[str] = mapped_column(String(250))
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    try_number: Mapped[int] = mapped_column(Integer)
    # The task instance's own identity in Airflow (its id on Airflow 3, the run's logical date on
    # Airflow 2; "" when the submitter did not say): tells a re-created DAG run from the deleted one.
    ti_identity: Mapped[str] = mapped_column(String(64), default="", server_default="")

    agent_id: Mapped[str] = mapped_column(String(128))
    command: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    rc: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    # Set together with STOPPING: the status to record once the agent confirms the stop, so that a
    # reconciler restarted between intent and agent call can finish the stop without asking Airflow.
    stop_status: Mapped[str | None] = mapped_column(String(16))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Revision 0006: the job is fenced by its agent (it asked, or the agent fences every job; see
    # agent_api/fencing.py): lost with its agent, it ends FAILED only once that fence has surely fired.
    at_most_once: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # And how long after its agent's last contact its fence has surely ended it, as the agent's terms
    # said at submission (agent_api.fencing.FenceTerms.gone_after); NULL: not known then.
    fence_seconds: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint(
            "dag_id", "task_id", "run_id", "map_index", "try_number", "ti_identity", name="uq_jobs_ti_key"
        ),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_run", "dag_id", "run_id"),
        Index("ix_jobs_updated_at", "updated_at"),
    )


class JobEvent(Base):
    """One row per status change: the audit trail."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    old_status: Mapped[str | None] = mapped_column(String(16))
    new_status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """A named lease: the replica whose ``holder`` id it carries runs the poll loop until ``expires_at``.

    ``expires_at`` is always computed by the database's own clock, so replicas' clocks never matter.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Agent(Base):
    """An agent that registered itself with the sidecar, as of its latest heartbeat (revision 0003)."""

    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    url: Mapped[str] = mapped_column(String(2000))
    labels: Mapped[str] = mapped_column(Text)  # a JSON list of strings
    max_jobs: Mapped[int] = mapped_column(Integer)  # 0: no limit
    jobs_running: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(100))
    draining: Mapped[bool] = mapped_column(Boolean)
    # A random id the agent process picks at each start: the same agent id under another instance is
    # that agent restarted (or another agent claiming its id).
    instance: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_seconds: Mapped[float] = mapped_column(Float)  # how often it says it heartbeats
    # The SHA-256 of the proof its home gives (revision 0004): a move to another URL must present that
    # proof. "" for an agent older than identities.
    identity_fingerprint: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # Revision 0005: the agent's credential is its identity proof (only its fingerprint is kept above).
    # The fingerprint it renewed away, kept so a renewal whose answer was lost is not a lock-out.
    previous_fingerprint: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # What the sidecar presents to this agent (it cannot present a hash): "" for an agent older than
    # credentials, which is sent the fleet token. A secret, as an [[agents]] token in the config is.
    call_token: Mapped[str] = mapped_column(String(64), default="", server_default="")
    credential_issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # the router DB's clock
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # agentic agents revoke
    # Revision 0006: its fence terms, as its heartbeats say them (agent_api/fencing.py); fence_after 0:
    # it fences nothing; NULL: not said (an agent of the previous release).
    fence_after_seconds: Mapped[float | None] = mapped_column(Float)  # NULL: not said
    fence_grace_seconds: Mapped[float | None] = mapped_column(Float)
    at_most_once_default: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Revision 0006 too: while it drains, by whom, since when, why and its timeout, as a JSON object
    # (agent_api.maintenance); "" when it does not say.
    maintenance: Mapped[str] = mapped_column(Text, default="", server_default="")
    # And why it takes no new job by itself (agent_api.maintenance.Unwell, as JSON); "" when well.
    unwell: Mapped[str] = mapped_column(Text, default="", server_default="")
