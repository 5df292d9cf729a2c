"""Fencing: whether a job asked for it (at_most_once), and each registered agent's fence terms; and a
registered agent's maintenance (who drained it, when, why, its timeout) and automatic maintenance (why
it takes no new job by itself), as its heartbeats say them.

A lost agent's fenced jobs end FAILED only once its fence has surely stopped them
(agent_api/fencing.py): the router DB keeps what that takes, for each job (whether its agent fences it,
and how long after the last contact that fence has surely ended it, as its agent's terms said when it
was submitted) and for each registered agent (its terms as its heartbeats say them). Existing rows get
false and NULL: jobs that never asked, agents that have not said (of the previous release, or not
heard since the upgrade); "" for no maintenance.

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("at_most_once", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("fence_seconds", sa.Float(), nullable=True))
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("fence_after_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("fence_grace_seconds", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("at_most_once_default", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("maintenance", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("unwell", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        for name in (
            "unwell",
            "maintenance",
            "at_most_once_default",
            "fence_grace_seconds",
            "fence_after_seconds",
        ):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fence_seconds")
        batch.drop_column("at_most_once")
