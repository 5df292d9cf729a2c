"""Registered agents keep the fingerprint of the identity their home proves, so one restarted at a new
URL may move its registration there at once (and nobody holding only the fleet token may).

Existing rows get "": agents registered before identities, which move only as they did before (once
silent for lost_after_seconds with no active job), until they register again at their own URL.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("identity_fingerprint", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("identity_fingerprint")
