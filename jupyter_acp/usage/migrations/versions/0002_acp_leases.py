"""``acp_leases``: admission leases, so that the daily quota holds across servers (issue 16).

One row per LLM request admitted and not yet settled; ``admission.py`` reads and writes it
under a per-user lock.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acp_leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("expires", sa.Float, nullable=False),
    )
    # a user's live leases: every admission sums them
    op.create_index("ix_acp_leases_user", "acp_leases", ["user", "expires"])


def downgrade() -> None:
    op.drop_index("ix_acp_leases_user", table_name="acp_leases")
    op.drop_table("acp_leases")
