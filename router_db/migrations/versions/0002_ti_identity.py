"""Jobs carry their task instance's identity in Airflow, so a re-created DAG run is a new run.

The same (dag, task, run, map index, try) may now name two task instances: one of a DAG run deleted
and one of the run triggered again with the same run_id. The key of a submission includes the
identity, so the new run's try gets a new job instead of the old one.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("ti_identity", sa.String(64), nullable=False, server_default=""))
        batch.drop_constraint("uq_jobs_ti_key", type_="unique")
        batch.create_unique_constraint(
            "uq_jobs_ti_key", ["dag_id", "task_id", "run_id", "map_index", "try_number", "ti_identity"]
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_ti_key", type_="unique")
        batch.create_unique_constraint(
            "uq_jobs_ti_key", ["dag_id", "task_id", "run_id", "map_index", "try_number"]
        )
        batch.drop_column("ti_identity")
