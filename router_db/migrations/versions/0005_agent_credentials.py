"""Registered agents hold credentials of their own: the fingerprint renewed away, the token the sidecar
presents to the agent, when the credential was issued, and when it was revoked.

Existing rows get "" and NULL: agents registered before credentials, which the sidecar calls with the
fleet token until they register again, and whose heartbeats still need the fleet token.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from router_db.models import UTCDateTime

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("previous_fingerprint", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("call_token", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("credential_issued_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("revoked_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        for name in ("revoked_at", "credential_issued_at", "call_token", "previous_fingerprint"):
            batch.drop_column(name)
