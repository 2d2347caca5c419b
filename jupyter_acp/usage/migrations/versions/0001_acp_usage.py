"""The ``acp_usage`` table as the ledger made it before Alembic (``metadata.create_all`` and
the spool's ``record_uid`` column with its unique index).

A database made by that version is not re-created: ``migrate.py`` brings it to this shape
(the steps the old ad-hoc migration did, plus BIGINT token columns on a server database) and
stamps it at this revision.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

#: Written out (not imported from ``schema.py``): a revision is a fixed point in history.
COUNTS = ("input_tokens", "output_tokens", "thought_tokens", "cached_read_tokens",
          "cached_write_tokens", "total_tokens")


def upgrade() -> None:
    op.create_table(
        "acp_usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("record_uid", sa.String(32)),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255)),
        sa.Column("turn", sa.Integer, nullable=False),
        # BIGINT: a report may claim up to 10**12 tokens, past PostgreSQL's 32-bit INTEGER
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNTS),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("currency", sa.String(8)),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
    )
    op.create_index("ix_acp_usage_user_day", "acp_usage", ["user", "day"])
    op.create_index("ix_acp_usage_session", "acp_usage", ["session_id"])
    # a replayed spool record is never doubled
    op.create_index("ix_acp_usage_record_uid", "acp_usage", ["record_uid"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_acp_usage_record_uid", table_name="acp_usage")
    op.drop_index("ix_acp_usage_session", table_name="acp_usage")
    op.drop_index("ix_acp_usage_user_day", table_name="acp_usage")
    op.drop_table("acp_usage")
