"""``acp_sessions`` and ``acp_session_events``: sessions that outlive the server (issue 18).

A session's record (owner, agent, the agent's ACP session id, title, mode, config options, cwd,
times) and its event history, so that after a server restart or an idle cull the user finds it
in their list and resumes it (``session_store.py``).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acp_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("agent", sa.String(255), nullable=False),
        sa.Column("acp_session_id", sa.Text),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("cwd", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(255)),
        sa.Column("meta", sa.Text, nullable=False),
        sa.Column("turns", sa.Integer, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("last_activity", sa.Float, nullable=False),
    )
    # a user's list, newest first; and the retention sweep
    op.create_index("ix_acp_sessions_user", "acp_sessions", ["user", "last_activity"])
    op.create_table(
        "acp_session_events",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("payload", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("acp_session_events")
    op.drop_index("ix_acp_sessions_user", table_name="acp_sessions")
    op.drop_table("acp_sessions")
