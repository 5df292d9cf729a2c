"""Agents that register themselves: the sidecar keeps each one's latest heartbeat.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from router_db.models import UTCDateTime

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(200), primary_key=True),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("max_jobs", sa.Integer, nullable=False),
        sa.Column("jobs_running", sa.Integer, nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("draining", sa.Boolean, nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("registered_at", UTCDateTime(), nullable=False),
        sa.Column("last_heartbeat_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_seconds", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agents")
